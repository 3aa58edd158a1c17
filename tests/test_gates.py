"""Gate helpers: apply_gate (open, closed, fills, per element), flatten round trip, checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.models import gates as gates_lib

# Insertion order shallow -> deep, deliberately not sorted by name.
SITE_CHANNELS = {"stem/conv": 3, "block2/conv1": 2, "block1/conv1": 4}
ACTS = jax.random.uniform(jax.random.key(0), (2, 5, 5, 3), minval=0.5, maxval=2.0)


def _random_gates(batch=2, seed=1):
    keys = jax.random.split(jax.random.key(seed), len(SITE_CHANNELS))
    return {
        site: jax.random.bernoulli(k, 0.5, (batch, c)).astype(jnp.float32)
        for k, (site, c) in zip(keys, SITE_CHANNELS.items(), strict=True)
    }


@pytest.mark.parametrize("use_jit", [False, True])
def test_apply_gate_open_closed_and_fills(use_jit):
    fn = jax.jit(gates_lib.apply_gate, static_argnums=1) if use_jit else gates_lib.apply_gate
    g = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    fill = jnp.array([0.25, -3.0, 7.0])
    for fills in (None, {"s": fill}):
        out = fn(ACTS, "s", {"s": g}, fills)
        chex.assert_shape(out, ACTS.shape)
        for b in range(2):
            for k in range(3):
                closed_value = 0.0 if fills is None else fill[k]
                expected = ACTS[b, ..., k] if g[b, k] == 1.0 else jnp.full((5, 5), closed_value)
                chex.assert_trees_all_equal(out[b, ..., k], expected)  # bit for bit
    # Fills for another site leave this one zero-ablated.
    chex.assert_trees_all_equal(
        fn(ACTS, "s", {"s": g}, {"other": fill}), fn(ACTS, "s", {"s": g}, None)
    )


def test_apply_gate_none_is_identity_and_missing_site_is_an_error():
    assert gates_lib.apply_gate(ACTS, "s", None) is ACTS
    with pytest.raises(KeyError, match="no entry for gate site 's'.*'t'"):
        gates_lib.apply_gate(ACTS, "s", {"t": jnp.ones((2, 3))})


def test_apply_gate_per_element():
    g = (jax.random.uniform(jax.random.key(3), ACTS.shape) > 0.5).astype(jnp.float32)
    out = gates_lib.apply_gate(ACTS, "s", {"s": g})
    chex.assert_trees_all_equal(out, jnp.where(g == 1.0, ACTS, 0.0))


def test_all_ones_complement_density():
    ones = gates_lib.all_ones(SITE_CHANNELS, 3)
    assert list(ones) == list(SITE_CHANNELS)
    for site, c in SITE_CHANNELS.items():
        chex.assert_shape(ones[site], (3, c))
        np.testing.assert_array_equal(ones[site], 1.0)
    gates = _random_gates()
    flat = np.asarray(gates_lib.flatten(gates))
    np.testing.assert_allclose(gates_lib.density(gates), flat.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(gates_lib.density(ones), 1.0)
    comp = gates_lib.complement(gates)
    np.testing.assert_allclose(gates_lib.density(comp), 1.0 - flat.mean(-1), rtol=1e-6)
    for site, d in gates_lib.site_density(gates).items():
        np.testing.assert_allclose(d, np.asarray(gates[site]).mean(-1), rtol=1e-6)
        np.testing.assert_array_equal(comp[site] + gates[site], 1.0)


def test_density_weights_sites_by_size():
    gates = {"a": jnp.ones((1, 1)), "b": jnp.zeros((1, 3))}
    np.testing.assert_allclose(gates_lib.density(gates), [0.25])


def test_flatten_unflatten_round_trip():
    gates = _random_gates(batch=3)
    flat = gates_lib.flatten(gates)
    chex.assert_shape(flat, (3, sum(SITE_CHANNELS.values())))
    # Sorted site order by default, whatever order the dict has.
    expected = np.concatenate([np.asarray(gates[s]) for s in sorted(SITE_CHANNELS)], -1)
    np.testing.assert_array_equal(flat, expected)
    reordered = {s: gates[s] for s in reversed(list(gates))}
    np.testing.assert_array_equal(gates_lib.flatten(reordered), flat)
    back = gates_lib.unflatten(flat, SITE_CHANNELS)
    assert set(back) == set(gates)
    chex.assert_trees_all_equal(back, gates)
    # Through jit, which returns dicts with sorted keys: the same flat layout.
    np.testing.assert_array_equal(jax.jit(gates_lib.flatten)(back), flat)
    # An explicit site order is honoured.
    order = list(SITE_CHANNELS)
    np.testing.assert_array_equal(
        gates_lib.flatten(gates, order), np.concatenate([gates[s] for s in order], -1)
    )


def test_iou_matrix_pairs_and_empty_rows():
    a = jnp.array([[0.0, 0, 0], [1, 1, 1], [1, 1, 0]])
    b = jnp.array([[0.0, 0, 0], [1, 0, 0]])
    iou = gates_lib.iou_matrix(a, b)
    chex.assert_shape(iou, (3, 2))
    # empty vs empty := 1; empty vs non-empty = 0; |{0} & {0,1,2}| / |{0,1,2}| = 1/3.
    np.testing.assert_allclose(iou, [[1.0, 0.0], [0.0, 1 / 3], [0.0, 1 / 2]], rtol=1e-6)
    np.testing.assert_allclose(gates_lib.iou_matrix(a, a), gates_lib.iou_matrix(a, a).T)
    np.testing.assert_allclose(jnp.diagonal(gates_lib.iou_matrix(a, a)), np.ones(3))


def test_check_sites_accepts_matching_gates():
    gates_lib.check_sites(_random_gates(), SITE_CHANNELS)
    gates_lib.check_sites(gates_lib.all_ones(SITE_CHANNELS, 1), SITE_CHANNELS)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda g: {**g, "block9/conv1": jnp.ones((2, 1))}, r"unknown \['block9/conv1'\]"),
        (lambda g: {k: v for k, v in g.items() if k != "stem/conv"}, r"missing \['stem/conv'\]"),
        (lambda g: {**g, "block1/conv1": jnp.ones((2, 5))}, "has 5 channels.*has 4"),
    ],
)
def test_check_sites_names_the_mismatch(change, match):
    with pytest.raises(ValueError, match=match):
        gates_lib.check_sites(change(_random_gates()), SITE_CHANNELS)
