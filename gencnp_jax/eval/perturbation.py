"""Metrics that perturb the classifier: neuron deletion / insertion curves (docs/METHOD.md
§7) and the weight randomisation of the sanity check (Adebayo et al. 2018, in pathway space).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.eval import baselines, metrics
from gencnp_jax.models import gates as gates_lib

LogitsFn = Callable[[gates_lib.Gates], jax.Array]  # gates -> f32[B, K]
CURVE_MODES = ("deletion", "insertion")
AUC_POINTS = 11  # evenly spaced fractions f = 0, 0.1, ..., 1 of every deletion / insertion curve


def perturbation_curve(
    logits_fn: LogitsFn,
    scores: Mapping[str, jax.Array],
    classes_B: jax.Array,
    mode: str,
    num_points: int = 11,
    key: jax.Array | None = None,
    rows_B: jax.Array | None = None,
) -> jax.Array:
    """``p_c`` after removing / adding the top-scored fraction ``f`` of neurons: ``f32[B, P]``.

    Neurons are ranked per instance by score over all sites (flattened; ties broken at random
    by `key`, the same order at every point); ``f = 0, 1/(P-1), ..., 1``.
    Deletion starts full and closes the top ``round(f * N)``; insertion starts empty and opens
    them. `rows_B`: per-row tie-breaking keys (`baselines.top_k`). `logits_fn` is traced once
    (`jax.lax.map`).
    """
    if mode not in CURVE_MODES:
        raise ValueError(f"unknown curve mode {mode!r}: choose one of {CURVE_MODES}")
    sites = {s: v.shape[-1] for s, v in scores.items()}
    flat_BxN = gates_lib.flatten(scores)

    def point(fraction):
        top_BxN = baselines.top_k_at_density(flat_BxN, fraction, key, rows_B)
        gates = gates_lib.unflatten(top_BxN if mode == "insertion" else 1.0 - top_BxN, sites)
        return metrics.class_confidence(logits_fn(gates), classes_B)

    return jax.lax.map(point, jnp.linspace(0.0, 1.0, num_points)).T


def curve_auc(curve_BxP: jax.Array) -> jax.Array:
    """Trapezoid area under ``p_c(f)`` on evenly spaced ``f`` in [0, 1]: ``f32[B]``."""
    return jnp.mean((curve_BxP[:, 1:] + curve_BxP[:, :-1]) / 2.0, axis=-1)


def deletion_auc(logits_fn, scores, classes_B, num_points=11, valid_B=None) -> jax.Array:
    """``mean_x int_0^1 p_c(x; top-f neurons closed) df`` (lower = scores find what matters)."""
    curve = perturbation_curve(logits_fn, scores, classes_B, "deletion", num_points)
    return metrics.masked_mean(curve_auc(curve), valid_B)


def insertion_auc(logits_fn, scores, classes_B, num_points=11, valid_B=None) -> jax.Array:
    """``mean_x int_0^1 p_c(x; only top-f neurons open) df`` (higher = better)."""
    curve = perturbation_curve(logits_fn, scores, classes_B, "insertion", num_points)
    return metrics.masked_mean(curve_auc(curve), valid_B)


def randomize_weights(state, seed: int):
    """A classifier state with every parameter re-drawn, BatchNorm statistics kept.

    Each parameter leaf ``w`` becomes ``mean(w) + std(w) * N(0, 1)`` (its own first two
    moments, its structure gone); leaves are drawn with independent keys. The parameters are
    an NNX state's `nnx.Param`s, or a Linen variables dict's ``params``; the rest is unchanged.
    """
    if not isinstance(state, nnx.State):  # Linen variables
        leaves, treedef = jax.tree.flatten(state["params"])
        return {**state, "params": jax.tree.unflatten(treedef, _redraw(leaves, seed))}
    params, rest = nnx.split_state(state, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    return nnx.merge_state(jax.tree.unflatten(treedef, _redraw(leaves, seed)), rest)


@jax.jit
def _redraw(leaves: list[jax.Array], seed) -> list[jax.Array]:
    # one compiled program: eager per-leaf ops would compile a kernel each
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return [
        (jnp.mean(w) + jnp.std(w) * jax.random.normal(k, w.shape)).astype(w.dtype)
        for k, w in zip(keys, leaves, strict=True)
    ]
