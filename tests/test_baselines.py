"""Baselines: exact binarisation counts; NeuronMCT and NeuronIntGrad against hand-computed
gradients under both ablations; CDRP's objective and steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gencnp_jax.eval import baselines
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

B = 4


@pytest.fixture(scope="module")
def tiny():
    model = classifiers.make_classifier("vgg", (8, 16, 16, 16), 3, 1, seed=0)
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (B, 8, 8, 1))
    classifier = FrozenClassifier(graphdef, state, model.site_channels, 3)
    return classifier, images, dict(model.site_channels), model


def _tail_logit(model, classes):
    """What VGG does after its last gate site, to the summed class logit."""

    def tail(a_BxHxWxC):
        if min(a_BxHxWxC.shape[1:3]) >= 2:
            a_BxHxWxC = nnx.max_pool(a_BxHxWxC, (2, 2), strides=(2, 2))
        out = model.head(jnp.mean(a_BxHxWxC, axis=(1, 2)))
        return jnp.take_along_axis(out, classes[:, None], -1).sum()

    return tail


def _cdrp(steps, gamma=0.05):
    return baselines.CdrpSettings(steps=steps, gamma=gamma, lr=0.1, momentum=0.9, threshold=0.5)


def _scores(site_channels, batch=B, seed=0):
    return baselines.random_scores(jax.random.key(seed), site_channels, batch)


def test_gates_at_density_exact_count_and_top_scores():
    site_channels = {"a": 3, "b": 7, "c": 10}
    scores = _scores(site_channels)
    density_B = jnp.array([0.0, 0.33, 0.55, 1.0])
    gates = jax.jit(baselines.gates_at_density)(scores, density_B)
    flat_g, flat_s = gates_lib.flatten(gates), gates_lib.flatten(scores)
    np.testing.assert_array_equal(flat_g.sum(-1), np.round(np.asarray(density_B) * 20))
    assert set(np.unique(flat_g).tolist()) <= {0.0, 1.0}
    for g, s in zip(np.asarray(flat_g), np.asarray(flat_s), strict=True):
        if 0 < g.sum() < len(g):
            assert s[g > 0].min() > s[g == 0].max()  # one global threshold
    ties = {"a": jnp.zeros((2, 5))}  # all tied: still exact in count
    assert float(baselines.gates_at_density(ties, 0.4)["a"].sum()) == 4.0


def test_top_k_breaks_ties_by_key_not_position():
    n, k = 40, 10
    scores_BxN = jnp.zeros((1, n)).at[0, :5].set(1.0)  # 5 clear winners, 35 tied channels
    picks = [
        np.asarray(baselines.top_k(scores_BxN, jnp.array([k]), jax.random.key(seed)))[0]
        for seed in range(200)
    ]
    for p in picks:
        assert p.sum() == k and p[:5].all()  # exact count, the clear winners always kept
    assert not np.array_equal(picks[0], picks[1])  # two keys choose differently among ties
    rate_N = np.mean(picks, 0)[5:]  # each tied channel is kept with probability 5/35
    np.testing.assert_allclose(rate_N, 5 / 35, atol=0.1)
    assert abs(rate_N[:17].mean() - rate_N[18:].mean()) < 0.05  # no positional bias
    rows = baselines.top_k(jnp.zeros((3, n)), jnp.full(3, k), jax.random.key(0), jnp.arange(3))
    alone = baselines.top_k(jnp.zeros((1, n)), jnp.array([k]), jax.random.key(0), jnp.array([2]))
    np.testing.assert_array_equal(rows[2], alone[0])  # a row's choice ignores its batch


def test_gates_at_site_density_exact_per_site():
    site_channels = {"a": 4, "b": 8, "c": 16}
    site_density = {
        "a": jnp.array([0.25, 0.5, 0.0, 1.0]),
        "b": jnp.full(B, 0.375),
        "c": jnp.zeros(B),
    }
    scores, gates = baselines.random_pathway(jax.random.key(3), site_channels, site_density)
    measured = gates_lib.site_density(gates)
    for site, d_B in site_density.items():
        chex.assert_trees_all_close(measured[site], d_B)
        assert scores[site].shape == (B, site_channels[site])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_neuron_mct_equals_hand_gradient_at_last_site(tiny, ablation):
    classifier, images, site_channels, model = tiny
    last = list(site_channels)[-1]
    logits, features = model(images)
    a = features[last]
    fills = None
    if ablation == "mean":  # the channel means of this batch: one channel sits at its mean
        fills = {s: f.mean(axis=(0, 1, 2)) for s, f in features.items()}
    classifier = classifier.with_fills(fills)
    scores, gates = jax.jit(lambda c, x: baselines.neuron_mct(c, x, density=0.25))(
        classifier, images
    )
    grad = jax.grad(_tail_logit(model, jnp.argmax(logits, -1)))(a)
    fill = 0.0 if fills is None else fills[last]
    by_hand = jnp.sum(jnp.abs((a - fill) * grad), axis=(1, 2))  # sum_hw |(a - fill) dy/da|
    chex.assert_trees_all_close(scores[last], by_hand, rtol=1e-4, atol=1e-6)
    total = sum(site_channels.values())
    np.testing.assert_array_equal(gates_lib.flatten(gates).sum(-1), np.full(B, round(0.25 * total)))


def test_zero_and_mean_ablation_scores_differ_where_they_must(tiny):
    """Closing a channel to the value it already has costs nothing: with fills equal to image
    0's own activations at the last site (1x1 there), mean ablation scores image 0's channels
    0 at that site, while zero ablation scores them by |a dy/da|."""
    classifier, images, site_channels, model = tiny
    last = list(site_channels)[-1]
    _, features = model(images)
    assert features[last].shape[1:3] == (1, 1)
    fills = {s: f.mean(axis=(0, 1, 2)) for s, f in features.items()}
    fills[last] = features[last][0, 0, 0]  # image 0's activation
    zero = baselines.neuron_mct(classifier, images)[0][last]
    mean = baselines.neuron_mct(classifier.with_fills(fills), images)[0][last]
    np.testing.assert_array_equal(mean[0], np.zeros_like(mean[0]))
    assert float(jnp.sum(zero[0])) > 0.0
    assert not np.allclose(zero[1:], mean[1:])  # other images: both nonzero, and different


def test_neuron_intgrad_equals_hand_integral_at_last_site(tiny):
    classifier, images, site_channels, model = tiny
    last = list(site_channels)[-1]
    logits, features = model(images)
    a = features[last]
    fills = {s: f.mean(axis=(0, 1, 2)) for s, f in features.items()}
    steps = 5
    run = jax.jit(lambda c, x: baselines.neuron_intgrad(c, x, steps=steps, density=0.5))
    scores, gates = run(classifier.with_fills(fills), images)
    tail = _tail_logit(model, jnp.argmax(logits, -1))
    fill = fills[last]
    # a~(alpha) = fill + alpha (a - fill) at the last site only; the element score is
    # |(a - fill) * mean_alpha dy/da~(alpha)|, a channel's the sum over space
    grads = [jax.grad(tail)(fill + alpha * (a - fill)) for alpha in np.linspace(0, 1, steps)]
    by_hand = jnp.sum(jnp.abs((a - fill) * jnp.mean(jnp.stack(grads), 0)), axis=(1, 2))
    chex.assert_trees_all_close(scores[last], by_hand, rtol=1e-4, atol=1e-6)
    for site, c in site_channels.items():
        chex.assert_shape([scores[site], gates[site]], (B, c))
    # at a shallower site the path to the logit is not linear: the integral is not the end
    # point's gradient, IntGrad is not NeuronMCT
    first = list(site_channels)[0]
    mct = baselines.neuron_mct(classifier.with_fills(fills), images)[0][first]
    assert not np.allclose(scores[first], mct, rtol=1e-3)


def test_neuron_mct_signed_is_the_abs_of_the_signed_sum(tiny):
    classifier, images, site_channels, _ = tiny
    signed = baselines.neuron_mct_signed(classifier, images)[0]
    unsigned = baselines.neuron_mct(classifier, images)[0]
    for site in site_channels:  # |sum x| <= sum |x|
        assert bool(jnp.all(signed[site] <= unsigned[site] + 1e-5))


def test_topk_activation_is_the_mean_activation(tiny):
    classifier, images, site_channels, _ = tiny
    scores, _ = baselines.topk_activation(classifier, images)
    _, features = classifier.classify(images)
    last = list(site_channels)[-1]
    chex.assert_trees_all_close(scores[last], features[last].mean(axis=(1, 2)), rtol=1e-5)


def test_cdrp_lowers_objective_and_keeps_prediction(tiny):
    classifier, images, site_channels, _ = tiny
    gamma = 0.05
    run = jax.jit(lambda c, x: baselines.cdrp(c, x, _cdrp(6, gamma)))
    scores, gates = run(classifier, images)
    full_logits = classifier.logits(images)
    kept_logits = classifier.logits(images, scores)
    np.testing.assert_array_equal(jnp.argmax(kept_logits, -1), jnp.argmax(full_logits, -1))

    def objective_B(logits_BxK, lam):
        p_BxK = jax.nn.softmax(full_logits)
        ce_B = -jnp.sum(p_BxK * jax.nn.log_softmax(logits_BxK), -1)
        return ce_B + gamma * jnp.abs(gates_lib.flatten(lam)).sum(-1)

    ones = gates_lib.all_ones(site_channels, B)
    assert bool(jnp.all(objective_B(kept_logits, scores) < objective_B(full_logits, ones)))
    assert float(gates_lib.flatten(scores).min()) >= 0.0
    assert set(np.unique(gates_lib.flatten(gates)).tolist()) <= {0.0, 1.0}


def test_cdrp_subgradient_leaves_a_closed_gate_closed():
    lam = {"a": jnp.array([0.0, 0.0, 0.0, 1.0, 4.99])}
    vel = {"a": jnp.zeros(5)}
    # class gradients: pushes down, none, pushes down, none, pushes up past the clamp
    ce_grad = {"a": jnp.array([0.3, 0.0, 0.01, 0.0, -1.0])}
    new_lam, new_vel = baselines.cdrp_update(lam, vel, ce_grad, 0.05, 0.1, 0.9)
    # sign(0) = 0: the L1 term adds nothing at a closed gate, so its velocity is only the class
    # gradient, and a gate the class gradient does not open stays exactly 0
    np.testing.assert_allclose(new_vel["a"][:3], [0.3, 0.0, 0.01])
    np.testing.assert_array_equal(new_lam["a"][:3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(new_lam["a"][3], 1.0 - 0.1 * 0.05)  # open: L1 pulls by gamma
    assert float(new_lam["a"][4]) == baselines.CDRP_MAX_GATE  # clamped to [0, 5]


def test_cdrp_takes_exactly_the_given_steps(tiny):
    classifier, images, _, _ = tiny
    for steps in (0, 1):  # iterate 0 (the full model) is the only one evaluated: all ones
        scores, _ = baselines.cdrp(classifier, images[:1], _cdrp(steps))
        assert all(bool(jnp.all(v == 1.0)) for v in jax.tree.leaves(scores))
