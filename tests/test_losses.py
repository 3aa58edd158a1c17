"""Each loss term against a hand-computed value; the class bank, partners and weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.method import losses


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


FULL = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], np.float32)
PATH = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]], np.float32)


@pytest.mark.parametrize("use_jit", [False, True])
def test_distillation_kl(use_jit):
    fn = jax.jit(losses.distillation_kl) if use_jit else losses.distillation_kl
    tau = 2.0
    expected = tau**2 * np.mean(_kl(_softmax(FULL / tau), _softmax(PATH / tau)))
    np.testing.assert_allclose(fn(FULL, PATH, tau), expected, rtol=1e-5)
    np.testing.assert_allclose(fn(FULL, FULL, tau), 0.0, atol=1e-6)


def test_top1_hinge():
    # Row 0: class 0, margin 1 - (1.0 - 0.5) = 0.5. Row 1: class 1, 1 - (0 - 2) = 3.
    np.testing.assert_allclose(losses.top1_hinge(FULL, PATH, 1.0), (0.5 + 3.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(losses.top1_hinge(FULL, FULL * 10, 1.0), 0.0)


def test_sparsity_weights_sites_by_size():
    scores = {"a": jnp.ones((2, 1)), "b": jnp.zeros((2, 3))}
    np.testing.assert_allclose(losses.sparsity(scores), 0.25)
    np.testing.assert_allclose(losses.sparsity(jnp.array([[1.0, 0.0, 0.0, 0.0]])), 0.25)


def test_pdn_kl():
    expected = np.mean(_kl(_softmax(FULL), _softmax(PATH)))
    np.testing.assert_allclose(losses.pdn_kl(FULL, PATH), expected, rtol=1e-5)


def test_class_pull():
    bank = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    s = jnp.array([[1.0, 0.0], [1.0, 0.5], [0.5, 0.5]])
    pred = jnp.array([0, 1, 1])
    # per sample: (1 + 0)/2, (0 + .25)/2, (.25 + .25)/2
    np.testing.assert_allclose(losses.class_pull(s, bank, pred), (0.5 + 0.125 + 0.25) / 3)
    counts = jnp.array([0, 4])
    np.testing.assert_allclose(losses.class_pull(s, bank, pred, counts), (0.125 + 0.25) / 2)
    g = jax.grad(lambda b: losses.class_pull(s, b, pred))(bank)
    chex.assert_trees_all_equal(g, jnp.zeros_like(bank))  # the bank is a stop-gradient target


def test_bank_ema_update():
    bank = jnp.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    counts = jnp.array([0, 3, 2])
    s = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.4]])
    pred = jnp.array([0, 0, 1])
    new_bank, new_counts = losses.bank_ema_update(bank, counts, s, pred, 0.9)
    expected = np.array([[0.5, 0.5], [0.9 + 0.1 * 0.2, 0.9 + 0.1 * 0.4], [0.5, 0.5]])
    np.testing.assert_allclose(new_bank, expected, rtol=1e-6)  # class 0 first visit: batch mean
    np.testing.assert_array_equal(new_counts, [2, 4, 2])


def test_partner_indices():
    idx, valid = losses.partner_indices(jnp.array([0, 0, 1, 2, 2]))
    np.testing.assert_array_equal(idx, [2, 2, 3, 0, 0])
    np.testing.assert_array_equal(valid, [True] * 5)
    idx, valid = losses.partner_indices(jnp.array([3, 3, 3]))
    np.testing.assert_array_equal(valid, [False] * 3)
    np.testing.assert_array_equal(idx, [0, 1, 2])
    idx, valid = jax.jit(losses.partner_indices)(jnp.array([7]))
    assert not bool(valid[0]) and int(idx[0]) == 0


def test_partners_differ_in_class():
    pred = jax.random.randint(jax.random.key(0), (16,), 0, 3)
    idx, valid = losses.partner_indices(pred)
    assert np.all(np.asarray(pred)[np.asarray(idx)][valid] != np.asarray(pred)[valid])


def test_leakage_hinge():
    full = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    classes = jnp.array([0, 0])
    valid = jnp.array([True, True])
    np.testing.assert_allclose(losses.leakage_hinge(full, full, classes, valid, 0.0), 0.0)
    less = full - jnp.array([[1.0, 0.0], [2.0, 0.0]])  # class-0 evidence removed: no penalty
    np.testing.assert_allclose(losses.leakage_hinge(full, less, classes, valid, 0.0), 0.0)
    more = jnp.array([[1.0, 0.0], [3.0, 1.0]])  # row 1: log p_0 rises
    rise = np.log(_softmax(np.array([3.0, 1.0]))[0]) - np.log(_softmax(np.array([0.0, 1.0]))[0])
    np.testing.assert_allclose(
        losses.leakage_hinge(full, more, classes, valid, 0.1), (rise - 0.1) / 2, rtol=1e-5
    )
    masked = jnp.array([True, False])
    np.testing.assert_allclose(losses.leakage_hinge(full, more, classes, masked, 0.1), 0.0)


def test_sparsity_ramp():
    np.testing.assert_allclose(losses.sparsity_ramp(0, 10, 2.0), 0.0)
    np.testing.assert_allclose(losses.sparsity_ramp(5, 10, 2.0), 1.0)
    np.testing.assert_allclose(jax.jit(losses.sparsity_ramp)(50, 10, 2.0), 2.0)
    np.testing.assert_allclose(losses.sparsity_ramp(0, 0, 2.0), 2.0)


def test_total_loss_and_weights_do_not_recompile():
    terms = {"kd": jnp.array(2.0), "sparsity": jnp.array(0.5), "leak": jnp.array(1.0)}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(terms, weights):
        return losses.total_loss(terms, weights)

    loss, aux = fn(terms, losses.LossWeights.create(sparsity=0.2, leak=3.0))
    np.testing.assert_allclose(loss, 2.0 + 0.1 + 3.0, rtol=1e-6)
    assert {"loss/kd", "loss/sparsity", "loss/leak", "loss/total"} <= set(aux)
    loss, _ = fn(terms, losses.LossWeights.create(sparsity=1.0, leak=0.0))
    np.testing.assert_allclose(loss, 2.5, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss terms"):
        losses.total_loss({"typo": jnp.array(1.0)}, losses.LossWeights.create())


def test_top1_hinge_capped_at_the_full_models_margin():
    full = jnp.array([[1.2, 1.0, 0.0]])  # the full model itself is unsure: margin 0.2
    path = jnp.array([[1.5, 1.0, 0.0]])  # the pathway keeps the class with margin 0.5
    assert float(losses.top1_hinge(full, path, 1.0)) == pytest.approx(0.5)
    assert float(losses.top1_hinge(full, path, 1.0, cap_at_full_margin=True)) == 0.0


def test_kd_budget_is_zero_and_flat_below_the_budget():
    full = jnp.array([[2.0, 0.0], [2.0, 0.0]])
    path = jnp.array([[1.9, 0.0], [-2.0, 0.0]])  # row 0 nearly faithful, row 1 flipped
    kl_B = losses.kl_rows(full, path)
    value = losses.kd_budget(full, path, 1.0, float(kl_B[0]) + 1e-3)
    assert float(value) == pytest.approx(float(kl_B[1] - kl_B[0] - 1e-3) / 2, rel=1e-5)
    grad = jax.grad(lambda p: losses.kd_budget(full, p, 1.0, float(kl_B[0]) + 1e-3))(path)
    assert np.all(np.asarray(grad[0]) == 0.0) and np.any(np.asarray(grad[1]) != 0.0)


def test_leakage_rank_hinge_penalises_only_a_class_brought_near_the_top():
    classes_c = jnp.array([0, 0, 0])
    gated = jnp.array(
        [
            [-5.0, 3.0, 0.0],  # c far below the top: removing x' evidence costs nothing
            [2.5, 3.0, 0.0],  # c within the margin of the top
            [4.0, 3.0, 0.0],  # c on top of another class's input: manufactured evidence
        ]
    )
    valid = jnp.array([True, True, True])
    per_row = [
        float(losses.leakage_rank_hinge(gated[i : i + 1], classes_c[:1], valid[:1], 1.0))
        for i in range(3)
    ]
    assert per_row == pytest.approx([0.0, 0.5, 2.0])
    none_valid = losses.leakage_rank_hinge(gated, classes_c, jnp.zeros(3, bool), 1.0)
    assert float(none_valid) == 0.0


def test_supervised_contrastive_prefers_class_aligned_masks():
    key = jax.random.key(0)
    classes = jnp.array([0, 0, 1, 1, 2, 2])
    prototypes = jax.random.bernoulli(key, 0.5, (3, 64)).astype(jnp.float32)
    aligned = prototypes[classes]
    shuffled = prototypes[jnp.array([0, 1, 2, 0, 1, 2])]
    low = losses.supervised_contrastive(aligned, classes, 0.1)
    high = losses.supervised_contrastive(shuffled, classes, 0.1)
    assert float(low) < float(high)
    chex.assert_tree_all_finite(jax.grad(losses.supervised_contrastive)(shuffled, classes, 0.1))
