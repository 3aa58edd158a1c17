"""Gates: the channel masks that turn a classifier into a pathway-restricted one.

A `Gates` pytree maps a gate site name (its module path, e.g. ``"block3/conv1"``)
to ``f32[B, C]`` (channel granularity) or ``f32[B, H, W, C]`` (per element).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Gates = dict[str, jax.Array]
Fills = dict[
    str, jax.Array
]  # site -> f32[C] (or broadcastable, e.g. f32[B,H,W,C]): what a closed gate leaves
SiteChannels = dict[str, int]  # site -> channel count, ordered shallow to deep


def apply_gate(
    acts_BxHxWxC: jax.Array,
    site: str,
    gates: Mapping[str, jax.Array] | None,
    fills: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """Gates one site's activation channel-wise (its last axis, any rank: ``(B, H, W, C)``,
    tokens ``(B, N, C)``, ``(B, C)``); a no-op when `gates` is None.

    ``out = g * a + (1 - g) * fill``: a closed gate (0) replaces the channel by its
    ablation value (zero by default, or e.g. its training-set mean), an open gate
    (1) passes it unchanged, bit for bit.
    """
    if gates is None:
        return acts_BxHxWxC
    if site not in gates:
        raise KeyError(f"gates has no entry for gate site {site!r}; sites given: {sorted(gates)}")
    g = gates[site].astype(acts_BxHxWxC.dtype)
    if g.ndim == 2:  # channel granularity: broadcast over positions / tokens, if any
        g = g.reshape(g.shape[:1] + (1,) * (acts_BxHxWxC.ndim - 2) + g.shape[1:])
    gated = acts_BxHxWxC * g
    if fills is not None and site in fills:
        gated = gated + (1.0 - g) * fills[site].astype(acts_BxHxWxC.dtype)
    return gated


def all_ones(site_channels: Mapping[str, int], batch: int) -> Gates:
    """The full model: every gate open."""
    return {site: jnp.ones((batch, c), jnp.float32) for site, c in site_channels.items()}


def complement(gates: Gates) -> Gates:
    """Closes the kept neurons and opens the rest (for necessity tests)."""
    return jax.tree.map(lambda g: 1.0 - g, gates)


def flatten(gates: Mapping[str, jax.Array], sites: list[str] | None = None) -> jax.Array:
    """Concatenates per-site gates into ``f32[B, N]`` (N = all neurons).

    Sites are taken in sorted name order unless `sites` is given: jit returns dicts with
    sorted keys, so sorted order is the one every caller agrees on.
    """
    sites = sorted(gates) if sites is None else sites
    return jnp.concatenate([gates[s].reshape(gates[s].shape[0], -1) for s in sites], axis=-1)


def unflatten(flat_BxN: jax.Array, site_channels: Mapping[str, int]) -> Gates:
    """Inverse of `flatten` (sorted site order) for channel-granular gates."""
    out, start = {}, 0
    for site in sorted(site_channels):
        c = site_channels[site]
        out[site] = flat_BxN[:, start : start + c]
        start += c
    return out


def density(gates: Mapping[str, jax.Array]) -> jax.Array:
    """Fraction of open neurons per instance over all sites: ``f32[B]``."""
    return jnp.mean(flatten(gates), axis=-1)


def site_density(gates: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Fraction of open neurons per instance at each site: ``site -> f32[B]``."""
    return {s: jnp.mean(g.reshape(g.shape[0], -1), axis=-1) for s, g in gates.items()}


def iou_matrix(a_BxN: jax.Array, b_MxN: jax.Array) -> jax.Array:
    """``IoU_ij = |a_i & b_j| / |a_i | b_j|`` of binary rows: ``f32[B, M]``.

    ``IoU(empty, empty) := 1`` (two empty pathways are identical).
    """
    a_BxN, b_MxN = a_BxN.astype(jnp.float32), b_MxN.astype(jnp.float32)
    inter_BxM = a_BxN @ b_MxN.T
    union_BxM = a_BxN.sum(-1)[:, None] + b_MxN.sum(-1)[None, :] - inter_BxM
    return jnp.where(union_BxM > 0, inter_BxM / jnp.maximum(union_BxM, 1.0), 1.0)


def check_sites(gates: Mapping[str, jax.Array], site_channels: Mapping[str, int]) -> None:
    """Raises a ValueError naming the mismatch when gates do not fit the classifier."""
    unknown = sorted(set(gates) - set(site_channels))
    missing = sorted(set(site_channels) - set(gates))
    if unknown or missing:
        raise ValueError(
            f"gates do not match the classifier's gate sites: unknown {unknown}, missing "
            f"{missing}; the classifier's sites are {list(site_channels)}"
        )
    for site, g in gates.items():
        if g.shape[-1] != site_channels[site]:
            raise ValueError(
                f"gates[{site!r}] has {g.shape[-1]} channels, the classifier has "
                f"{site_channels[site]} at that site"
            )
