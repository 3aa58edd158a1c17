"""Property tests of DAQ: soft value = round(s), binary gates, finite non-zero gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.eval import baselines
from gencnp_jax.models import daq

GRID = np.concatenate([np.linspace(0.0, 0.499, 500), np.linspace(0.501, 1.0, 500)])


@pytest.mark.parametrize("temperature,sigma", [(2.0, 2.0), (1.0, 0.5), (5.0, 10.0)])
def test_soft_value_equals_round(temperature, sigma):
    s = jnp.asarray(GRID, jnp.float32)
    soft = daq.daq_soft(s, temperature, sigma)
    np.testing.assert_allclose(soft, np.round(GRID), atol=1e-6)


def test_corrected_levels():
    lo, hi = daq.corrected_levels(2.0)
    np.testing.assert_allclose([lo, hi], [-1 / (np.e**2 - 1), 1 + 1 / (np.e**2 - 1)], rtol=1e-6)


@pytest.mark.parametrize("use_jit", [False, True])
def test_binarize_is_exactly_binary(use_jit):
    fn = jax.jit(daq.binarize) if use_jit else daq.binarize
    s = jax.random.uniform(jax.random.key(0), (8, 16))
    gates = fn(s, 2.0, 2.0)
    assert set(np.unique(np.asarray(gates)).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(gates, (np.asarray(s) > 0.5).astype(np.float32))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("fn", [daq.daq_soft, daq.binarize])
def test_gradient_finite_and_nonzero(fn, use_jit):
    grad = jax.vmap(jax.grad(lambda x: fn(x, 2.0, 2.0)))
    grad = jax.jit(grad) if use_jit else grad
    g = grad(jnp.asarray(np.append(GRID, 0.5), jnp.float32))
    chex.assert_tree_all_finite(g)
    assert np.all(np.asarray(g) > 0.0)


def test_gradient_matches_formula():
    t, sigma, s = 2.0, 2.0, 0.3
    k_far = np.exp(-1 / (2 * sigma**2))
    gap = abs(k_far * s - (1 - s))
    sig_t = 1 / (1 + np.exp(-t))
    expected = (1 + 2 / np.expm1(t)) * sig_t * (1 - sig_t) * t * (1 + k_far) / gap
    np.testing.assert_allclose(jax.grad(daq.daq_soft)(s, t, sigma), expected, rtol=1e-5)


def test_top_fraction_is_the_evaluations_top_k_with_a_gradient_at_the_cut():
    scores_BxN = jax.random.uniform(jax.random.key(3), (4, 200))
    density_B = jnp.array([0.05, 0.1, 0.25, 0.4])
    top_BxN = daq.top_fraction(scores_BxN, density_B, 0.3)
    expected = baselines.top_k_at_density(scores_BxN, density_B)  # no ties in random scores
    chex.assert_trees_all_equal(top_BxN, expected)
    np.testing.assert_array_equal(np.asarray(top_BxN).sum(-1), [10, 20, 50, 80])
    # the cut moves with the scores: a shift of a row changes nothing, gradients sum to 0
    weights_BxN = jax.random.normal(jax.random.key(4), (4, 200))
    loss = lambda s, t=0.3: jnp.sum(weights_BxN * daq.top_fraction(s, density_B, t))
    grad_BxN = np.asarray(jax.grad(loss)(scores_BxN))
    np.testing.assert_allclose(grad_BxN.sum(-1), 0.0, atol=1e-4)
    assert np.abs(grad_BxN).max() > 1.0
    # the channel just below row 2's cut (it keeps 50) opens as its own score rises
    order = np.argsort(-np.asarray(scores_BxN[2]))
    j, far = order[50], order[-1]
    gate_j = lambda s: daq.top_fraction(s, density_B, 0.3)[2, j]
    g = np.asarray(jax.grad(gate_j)(scores_BxN))[2]
    assert g[j] > 0.0 and g[j] > 10 * abs(g[far])
    narrow = np.asarray(jax.grad(lambda s: loss(s, 0.05))(scores_BxN))
    assert np.abs(narrow[2, order[150:]]).sum() < np.abs(grad_BxN[2, order[150:]]).sum()


def test_top_fraction_is_exact_in_count_on_ties():
    """Tied scores at the cut: exactly round(d N) gates open (a cut between two equal scores
    used to keep neither, fewer than k)."""
    scores_BxN = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [1.0] * 6])
    density_B = jnp.asarray([0.5, 0.5])  # k = 3: row 0's cut falls inside its tie at 2.0
    top_BxN = np.asarray(daq.top_fraction(scores_BxN, density_B, 0.3))
    np.testing.assert_array_equal(top_BxN.sum(-1), [3, 3])
    np.testing.assert_array_equal(top_BxN[0], [1, 1, 1, 0, 0, 0])
    assert set(np.unique(top_BxN).tolist()) <= {0.0, 1.0}
