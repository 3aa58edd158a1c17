"""Baselines: exact binarisation counts, NeuronMCT against a hand gradient, CDRP's objective."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gencnp_jax.eval import baselines
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib

B = 4


@pytest.fixture(scope="module")
def tiny():
    model = classifiers.make_classifier("vgg", (8, 16, 16, 16), 3, 1, seed=0)
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (B, 8, 8, 1))
    return graphdef, state, images, dict(model.site_channels)


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


def test_neuron_mct_equals_hand_gradient_at_last_site(tiny):
    graphdef, state, images, site_channels = tiny
    scores, gates = jax.jit(lambda st, x: baselines.neuron_mct(graphdef, st, x, density=0.25))(
        state, images
    )
    model = nnx.merge(graphdef, state)
    logits, features = model(images)
    classes = jnp.argmax(logits, -1)
    last = list(site_channels)[-1]

    def tail(a_BxHxWxC):  # what VGG does after its last gate site
        if min(a_BxHxWxC.shape[1:3]) >= 2:
            a_BxHxWxC = nnx.max_pool(a_BxHxWxC, (2, 2), strides=(2, 2))
        out = model.head(jnp.mean(a_BxHxWxC, axis=(1, 2)))
        return jnp.take_along_axis(out, classes[:, None], -1).sum()

    a = features[last]
    by_hand = jnp.sum(jnp.abs(a * jax.grad(tail)(a)), axis=(1, 2))  # sum_hw |a dy/da|
    chex.assert_trees_all_close(scores[last], by_hand, rtol=1e-4, atol=1e-6)
    total = sum(site_channels.values())
    np.testing.assert_array_equal(gates_lib.flatten(gates).sum(-1), np.full(B, round(0.25 * total)))


def test_neuron_mct_signed_is_the_abs_of_the_signed_sum(tiny):
    graphdef, state, images, site_channels = tiny
    signed = baselines.neuron_mct_signed(graphdef, state, images)[0]
    unsigned = baselines.neuron_mct(graphdef, state, images)[0]
    for site in site_channels:  # |sum x| <= sum |x|
        assert bool(jnp.all(signed[site] <= unsigned[site] + 1e-5))


def test_fills_reach_the_scores(tiny):
    graphdef, state, images, site_channels = tiny
    fills = {s: jnp.full((c,), 0.5) for s, c in site_channels.items()}
    fn = jax.jit(lambda st, x, f: baselines.neuron_mct(graphdef, st, x, fills=f)[0])
    last = list(site_channels)[-1]
    assert not np.allclose(fn(state, images, fills)[last], fn(state, images, None)[last])


def test_intgrad_and_topk_shapes(tiny):
    graphdef, state, images, site_channels = tiny
    run = jax.jit(lambda st, x: baselines.neuron_intgrad(graphdef, st, x, steps=4, density=0.5))
    scores, gates = run(state, images)
    chex.assert_tree_all_finite(scores)
    for site, c in site_channels.items():
        chex.assert_shape([scores[site], gates[site]], (B, c))
        assert float(scores[site].min()) >= 0.0
    scores, _ = baselines.topk_activation(graphdef, state, images)
    _, features = classifiers.forward(graphdef, state, images)
    last = list(site_channels)[-1]
    chex.assert_trees_all_close(scores[last], features[last].mean(axis=(1, 2)), rtol=1e-5)


def test_cdrp_lowers_objective_and_keeps_prediction(tiny):
    graphdef, state, images, site_channels = tiny
    gamma = 0.05
    run = jax.jit(lambda st, x: baselines.cdrp(graphdef, st, x, steps=6, gamma=gamma))
    scores, gates = run(state, images)
    full_logits, _ = classifiers.forward(graphdef, state, images)
    kept_logits, _ = classifiers.forward(graphdef, state, images, scores)
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
    graphdef, state, images, _ = tiny
    for steps in (0, 1):  # iterate 0 (the full model) is the only one evaluated: all ones
        scores, _ = baselines.cdrp(graphdef, state, images[:1], steps=steps)
        assert all(bool(jnp.all(v == 1.0)) for v in jax.tree.leaves(scores))
