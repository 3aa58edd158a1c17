"""Each loss term against a hand-computed value; partners, weights and the masked mean."""

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
    # Row 0: class 0, full margin 2 >= 1, hinge 1 - (1.0 - 0.5) = 0.5. Row 1: class 1, full
    # margin 1, hinge 1 - (0 - 2) = 3.
    np.testing.assert_allclose(losses.top1_hinge(FULL, PATH, 1.0), (0.5 + 3.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(losses.top1_hinge(FULL, FULL * 10, 1.0), 0.0)


def test_sparsity_weights_sites_by_size():
    scores = {"a": jnp.ones((2, 1)), "b": jnp.zeros((2, 3))}
    np.testing.assert_allclose(losses.sparsity(scores), 0.25)
    np.testing.assert_allclose(losses.sparsity(jnp.array([[1.0, 0.0, 0.0, 0.0]])), 0.25)


def test_pdn_kl():
    expected = np.mean(_kl(_softmax(FULL), _softmax(PATH)))
    np.testing.assert_allclose(losses.pdn_kl(FULL, PATH), expected, rtol=1e-5)


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

    loss, aux = fn(terms, _weights(sparsity=0.2, leak=3.0))
    np.testing.assert_allclose(loss, 2.0 + 0.1 + 3.0, rtol=1e-6)
    assert {"loss/kd", "loss/sparsity", "loss/leak", "loss/total"} <= set(aux)
    loss, _ = fn(terms, _weights(sparsity=1.0, leak=0.0))
    np.testing.assert_allclose(loss, 2.5, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss terms"):
        losses.total_loss({"typo": jnp.array(1.0)}, _weights())


def _weights(**given):
    return losses.LossWeights.create(
        **{t: given.get(t, 1.0 if t == "kd" else 0.0) for t in losses.TERMS}
    )


def test_loss_weights_name_every_term_and_report_the_active_ones():
    with pytest.raises(ValueError, match="missing terms"):
        losses.LossWeights.create(kd=1.0)
    with pytest.raises(ValueError, match=r"unknown terms \['pull'\]"):
        losses.LossWeights.create(pull=1.0, **{t: 1.0 for t in losses.TERMS})
    assert _weights(leak=2.0, distill=0.5).active() == ("kd", "leak", "distill")


def test_masked_mean_ignores_zero_weight_rows_and_names_its_empty_value():
    values = jnp.array([1.0, jnp.nan, 3.0])
    weights = jnp.array([1.0, 0.0, 1.0])
    assert float(losses.masked_mean(values, weights)) == 2.0  # the NaN row does not count
    assert np.isnan(float(losses.masked_mean(values, jnp.zeros(3))))
    assert float(losses.masked_mean(values, jnp.zeros(3), empty=0.0)) == 0.0
    grad = jax.grad(lambda v: losses.masked_mean(v, jnp.array([1.0, 0.0, 1.0])))(jnp.ones(3))
    np.testing.assert_array_equal(grad, [0.5, 0.0, 0.5])


def test_top1_hinge_capped_at_the_full_models_margin():
    full = jnp.array([[1.2, 1.0, 0.0]])  # the full model itself is unsure: margin 0.2
    path = jnp.array([[1.5, 1.0, 0.0]])  # the pathway keeps the class with margin 0.5
    assert float(losses.top1_hinge(full, path, 1.0)) == 0.0  # capped at 0.2: nothing to push
    less = jnp.array([[1.1, 1.0, 0.0]])  # margin 0.1, below the full model's 0.2
    assert float(losses.top1_hinge(full, less, 1.0)) == pytest.approx(0.1, rel=1e-5)


def test_leakage_hinge_penalises_only_a_class_brought_near_the_top():
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
        float(losses.leakage_hinge(gated[i : i + 1], classes_c[:1], valid[:1], 1.0))
        for i in range(3)
    ]
    assert per_row == pytest.approx([0.0, 0.5, 2.0])
    none_valid = losses.leakage_hinge(gated, classes_c, jnp.zeros(3, bool), 1.0)
    assert float(none_valid) == 0.0


def test_listnet_asks_for_the_teachers_order_only():
    teacher = jnp.array([[3.0, 1.0, 0.0, -2.0, 0.5], [0.0, 2.0, -1.0, 1.0, 4.0]])
    # any positive scale and offset of the teacher per row: nothing to learn
    same_order = 7.0 * teacher + jnp.array([[2.0], [-5.0]])
    assert float(losses.listnet(same_order, teacher)) == pytest.approx(0.0, abs=1e-6)
    reversed_order = -teacher
    assert float(losses.listnet(reversed_order, teacher)) > 0.5
    # the KL of the two row-standardised softmaxes, by hand
    z = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    student = np.asarray([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0, 2.0]], np.float32)
    expected = _kl(_softmax(z(np.asarray(teacher))), _softmax(z(student))).mean()
    assert float(losses.listnet(jnp.asarray(student), teacher)) == pytest.approx(expected, rel=1e-4)
    # gradient steps on the student move its order to the teacher's; none reaches the teacher
    grad_t = jax.grad(lambda t: losses.listnet(jnp.asarray(student), t))(teacher)
    chex.assert_trees_all_equal(grad_t, jnp.zeros_like(teacher))
    s = jnp.asarray(student)
    for _ in range(200):
        s = s - 2.0 * jax.grad(losses.listnet)(s, teacher)
    np.testing.assert_array_equal(np.argsort(np.asarray(s)), np.argsort(np.asarray(teacher)))
