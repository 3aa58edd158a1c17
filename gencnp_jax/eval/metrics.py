"""Pathway evaluation metrics (docs/METHOD.md §7) as pure jnp functions of logits and gates.

One home per formula: each metric is written once as a per-instance function (``*_B``:
values, or ``(values, weights)`` when only some rows count), and its batch mean is
``masked_mean`` of that. `accumulator.instance_metrics` reuses the same per-instance functions.
Every mean takes an optional ``valid_B`` mask (eval batches are padded) and ignores invalid rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from gencnp_jax.method import losses
from gencnp_jax.models import gates as gates_lib

MAX_PAIR_ROWS = 512  # pairwise IoU metrics use the first 512 rows: O(B^2) memory otherwise
Weighted = tuple[jax.Array, jax.Array]  # (values f32[B], weights f32[B])


def _mask(valid_B: jax.Array | None, batch: int) -> jax.Array:
    return jnp.ones((batch,), jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)


masked_mean = losses.masked_mean  # one home (method.losses): NaN when no row is valid


def explained_classes(full_logits_BxK: jax.Array, classes_B: jax.Array | None = None) -> jax.Array:
    """The explained class c: `classes_B` if given, else the full model's argmax."""
    return jnp.argmax(full_logits_BxK, axis=-1) if classes_B is None else classes_B


def class_confidence(logits_BxK: jax.Array, classes_B: jax.Array) -> jax.Array:
    """``p_c = softmax(logits)[c]`` per row: ``f32[B]``."""
    probs_BxK = jax.nn.softmax(logits_BxK.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probs_BxK, classes_B[:, None].astype(jnp.int32), axis=-1)[:, 0]


def relative_drop(full_logits_BxK, other_logits_BxK, classes_B) -> jax.Array:
    """``max(0, Y - O) / Y`` per row, ``Y = p_c(full)``, ``O = p_c(other)``: ``f32[B]``."""
    y_B = class_confidence(full_logits_BxK, classes_B)
    o_B = class_confidence(other_logits_BxK, classes_B)
    return jnp.maximum(y_B - o_B, 0.0) / jnp.maximum(y_B, 1e-12)


# ---- per-instance metrics: the one place each formula is written ----


def increase_B(full_logits_BxK, pathway_logits_BxK, classes_B) -> jax.Array:
    """``100 * 1[O > Y]`` per row, ``Y = p_c(x)``, ``O = p_c(x; P)`` (mIC's terms)."""
    y_B = class_confidence(full_logits_BxK, classes_B)
    return 100.0 * (class_confidence(pathway_logits_BxK, classes_B) > y_B).astype(jnp.float32)


def drop_B(full_logits_BxK, pathway_logits_BxK, classes_B) -> jax.Array:
    """``100 * max(0, Y - O) / Y`` per row (mDC's terms)."""
    return 100.0 * relative_drop(full_logits_BxK, pathway_logits_BxK, classes_B)


def agreement_B(full_logits_BxK, pathway_logits_BxK) -> jax.Array:
    """``1[argmax H(x; P) == argmax H(x)]`` per row."""
    same_B = jnp.argmax(pathway_logits_BxK, -1) == jnp.argmax(full_logits_BxK, -1)
    return same_B.astype(jnp.float32)


def leakage_B(partner_pathway_logits_BxK, classes_B, partner_classes_B, valid_B=None) -> Weighted:
    """``(1[argmax H(x'; P(x)) = c(x)], 1[c(x') != c(x)])`` per row (row i holds x'_i's logits)."""
    pair_B = (classes_B != partner_classes_B) & (_mask(valid_B, classes_B.shape[0]) > 0)
    hit_B = jnp.argmax(partner_pathway_logits_BxK, -1) == classes_B
    return hit_B.astype(jnp.float32), pair_B.astype(jnp.float32)


def class_leakage_B(transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B=None):
    """``(1[argmax H(x; P_k) = k], 1[k != c(x)])`` per row, ``k = pathway_classes_B``."""
    other_B = (pathway_classes_B != sample_classes_B) & (_mask(valid_B, len(sample_classes_B)) > 0)
    hit_B = jnp.argmax(transfer_logits_BxK, -1) == pathway_classes_B
    return hit_B.astype(jnp.float32), other_B.astype(jnp.float32)


def other_class_drop_B(
    full_logits_BxK, transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B=None
) -> Weighted:
    """``(max(0, Y - O) / Y, 1[k != y])`` per row, ``Y = p_y(x)``, ``O = p_y(x; P_k)``."""
    other_B = (pathway_classes_B != sample_classes_B) & (_mask(valid_B, len(sample_classes_B)) > 0)
    drop = relative_drop(full_logits_BxK, transfer_logits_BxK, sample_classes_B)
    return drop, other_B.astype(jnp.float32)


iou_matrix = gates_lib.iou_matrix  # IoU_ij of binary rows (one home: models.gates)


def paired_iou_B(a_BxN: jax.Array, b_BxN: jax.Array) -> jax.Array:
    """``IoU(a_i, b_i)`` per row: the diagonal of `iou_matrix`, computed row by row (O(B N))."""
    return jax.vmap(lambda a_N, b_N: iou_matrix(a_N[None], b_N[None])[0, 0])(a_BxN, b_BxN)


# ---- batch means of the per-instance metrics ----


def mIC(full_logits_BxK, pathway_logits_BxK, classes_B=None, valid_B=None) -> jax.Array:
    """Increase in confidence: ``100 * mean(1[O > Y])``, ``Y = p_c(x)``, ``O = p_c(x; P)``."""
    c_B = explained_classes(full_logits_BxK, classes_B)
    return masked_mean(increase_B(full_logits_BxK, pathway_logits_BxK, c_B), valid_B)


def mDC(full_logits_BxK, pathway_logits_BxK, classes_B=None, valid_B=None) -> jax.Array:
    """Drop in confidence: ``100 * mean(max(0, Y - O) / Y)``."""
    c_B = explained_classes(full_logits_BxK, classes_B)
    return masked_mean(drop_B(full_logits_BxK, pathway_logits_BxK, c_B), valid_B)


def agreement(full_logits_BxK, pathway_logits_BxK, valid_B=None) -> jax.Array:
    """``mean(argmax H(x; P) == argmax H(x))``."""
    return masked_mean(agreement_B(full_logits_BxK, pathway_logits_BxK), valid_B)


def density_mean(gates: Mapping[str, jax.Array], valid_B=None) -> jax.Array:
    """Mean over instances of the overall density ``kept / all neurons``."""
    return masked_mean(gates_lib.density(gates), valid_B)


def density_std(gates: Mapping[str, jax.Array], valid_B=None) -> jax.Array:
    """Population std over instances of the overall density: ``sqrt(mean((d - mean d)^2))``."""
    d_B = gates_lib.density(gates)
    return jnp.sqrt(masked_mean((d_B - masked_mean(d_B, valid_B)) ** 2, valid_B))


def per_site_density(gates: Mapping[str, jax.Array], valid_B=None) -> dict[str, jax.Array]:
    """``site -> mean over instances of kept / all neurons at that site``."""
    return {s: masked_mean(d_B, valid_B) for s, d_B in gates_lib.site_density(gates).items()}


def _pairs(classes_B, valid_B, max_rows):
    """Capped rows, their IoU matrix inputs and the upper-triangle (i < j) valid-pair mask."""
    classes_B = classes_B[:max_rows]
    w_B = _mask(None if valid_B is None else valid_B[:max_rows], classes_B.shape[0])
    upper_BxB = jnp.triu(jnp.ones((classes_B.shape[0],) * 2, jnp.float32), k=1)
    return classes_B, w_B, upper_BxB * w_B[:, None] * w_B[None, :]


def acIOU(gates_flat_BxN, classes_B, num_classes: int, valid_B=None, max_rows=MAX_PAIR_ROWS):
    """Average class IoU: ``mean_k mean_{i<j, c_i=c_j=k} IoU(P_i, P_j)``.

    The mean over k runs over classes with >= 2 valid rows (NaN if there is none). Only the
    first `max_rows` rows are used (pairwise cost).
    """
    classes_B, w_B, pair_BxB = _pairs(classes_B, valid_B, max_rows)
    iou_BxB = iou_matrix(gates_flat_BxN[:max_rows], gates_flat_BxN[:max_rows]) * pair_BxB
    onehot_BxK = jax.nn.one_hot(classes_B, num_classes) * w_B[:, None]
    sums_K = jnp.einsum("ik,ij,jk->k", onehot_BxK, iou_BxB, onehot_BxK)
    n_K = onehot_BxK.sum(0)
    has_pairs_K = n_K >= 2
    mean_K = sums_K / jnp.maximum(n_K * (n_K - 1) / 2, 1.0)
    return jnp.sum(jnp.where(has_pairs_K, mean_K, 0.0)) / jnp.where(
        has_pairs_K.any(), has_pairs_K.sum(), jnp.nan
    )


def inter_class_iou(gates_flat_BxN, classes_B, valid_B=None, max_rows=MAX_PAIR_ROWS):
    """Mean IoU over pairs ``i < j`` of different classes (first `max_rows` rows); NaN if none."""
    classes_B, _, pair_BxB = _pairs(classes_B, valid_B, max_rows)
    pair_BxB = pair_BxB * (classes_B[:, None] != classes_B[None, :])
    iou_BxB = iou_matrix(gates_flat_BxN[:max_rows], gates_flat_BxN[:max_rows])
    return jnp.sum(iou_BxB * pair_BxB) / jnp.where(pair_BxB.sum() > 0, pair_BxB.sum(), jnp.nan)


def sanity_iou(gates_a_flat_BxN, gates_b_flat_BxN, valid_B=None) -> jax.Array:
    """``mean_i IoU(P_i, P'_i)``: pathways of the trained vs. a weight-randomised classifier."""
    return masked_mean(paired_iou_B(gates_a_flat_BxN, gates_b_flat_BxN), valid_B)


def necessity_drop(full_logits_BxK, complement_logits_BxK, classes_B=None, valid_B=None):
    """Relative drop when the pathway is removed: ``mean(max(0, Y - O_comp) / Y)``."""
    c_B = explained_classes(full_logits_BxK, classes_B)
    return masked_mean(relative_drop(full_logits_BxK, complement_logits_BxK, c_B), valid_B)


def different_class_partners(classes_B: jax.Array, valid_B=None) -> tuple[jax.Array, jax.Array]:
    """For each row i, the first valid row ``j = i+1, i+2, ...`` (cyclic) with another class.

    Returns:
      ``(partner_B, has_partner_B)``: int32 indices, and whether such a row exists.
    """
    b = classes_B.shape[0]
    w_B = _mask(valid_B, b) > 0
    offsets_S = jnp.arange(1, b)
    cand_BxS = (jnp.arange(b)[:, None] + offsets_S[None, :]) % b
    ok_BxS = (classes_B[cand_BxS] != classes_B[:, None]) & w_B[cand_BxS] & w_B[:, None]
    first_B = jnp.argmax(ok_BxS, axis=-1)
    partner_B = jnp.take_along_axis(cand_BxS, first_B[:, None], -1)[:, 0].astype(jnp.int32)
    return partner_B, ok_BxS.any(axis=-1)


def leakage(partner_pathway_logits_BxK, classes_B, partner_classes_B, valid_B=None):
    """Fraction of pairs ``(x, x')`` with ``c(x) != c(x')`` where ``argmax H(x'; P(x)) = c(x)``.

    Row i holds ``H(x'_i; P(x_i))``; rows with equal classes or invalid rows do not count.
    """
    return masked_mean(
        *leakage_B(partner_pathway_logits_BxK, classes_B, partner_classes_B, valid_B)
    )


def null_confidence(null_pathway_logits_BxK, classes_B, valid_B=None) -> jax.Array:
    """``mean p_c(0; P(x))``: class-c confidence of the pathway model on an all-zero image."""
    return masked_mean(class_confidence(null_pathway_logits_BxK, classes_B), valid_B)


def class_leakage(transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B=None):
    """Fraction of other-class samples that a class-k pathway turns into k.

    Row i holds ``H(x_i; P_k)`` with ``k = pathway_classes_B[i]``; only rows with
    ``k != sample_classes_B[i]`` count: ``mean(1[argmax H(x; P_k) = k])``.
    """
    return masked_mean(
        *class_leakage_B(transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B)
    )


def other_class_drop(
    full_logits_BxK, transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B=None
):
    """Mean relative drop of the own-class confidence under a wrong class's pathway.

    ``mean(max(0, Y - O) / Y)`` with ``Y = p_y(x)``, ``O = p_y(x; P_k)``, ``y`` the sample's
    class, over rows with ``k != y``.
    """
    return masked_mean(
        *other_class_drop_B(
            full_logits_BxK, transfer_logits_BxK, pathway_classes_B, sample_classes_B, valid_B
        )
    )
