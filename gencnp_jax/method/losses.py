"""The generator's training objective (docs/METHOD.md §4) as pure functions of logits and scores.

Every term returns a scalar; `total_loss` weights them with a `LossWeights` pytree.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp

TERMS = tuple("kd hinge sparsity pdn pull leak contrast budget distill ranked ranked_leak".split())


def kl_rows(teacher_logits_BxK: jax.Array, student_logits_BxK: jax.Array) -> jax.Array:
    """``KL(softmax(t) || softmax(s))`` per row: ``f32[B]``; the teacher is stop-gradient."""
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_BxK), axis=-1)
    log_q = jax.nn.log_softmax(student_logits_BxK, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_kl(
    full_logits_BxK: jax.Array, pathway_logits_BxK: jax.Array, tau: float | jax.Array = 1.0
) -> jax.Array:
    """Faithfulness (4a): ``tau^2 * mean_i KL(p_i || p~_i)``.

    ``p = softmax(H(x) / tau)`` (stop-gradient), ``p~ = softmax(H(x; m) / tau)``.
    """
    return tau**2 * jnp.mean(kl_rows(full_logits_BxK / tau, pathway_logits_BxK / tau))


def _top_margin(logits_BxK: jax.Array, classes_B: jax.Array) -> jax.Array:
    """``z_{c} - max_{k != c} z_k`` per row: ``f32[B]``."""
    onehot_BxK = jax.nn.one_hot(classes_B, logits_BxK.shape[-1])
    target_B = jnp.sum(onehot_BxK * logits_BxK, axis=-1)
    return target_B - jnp.max(jnp.where(onehot_BxK > 0, -jnp.inf, logits_BxK), axis=-1)


def top1_hinge(
    full_logits_BxK: jax.Array,
    pathway_logits_BxK: jax.Array,
    margin: float | jax.Array = 1.0,
    cap_at_full_margin: bool | jax.Array = False,
) -> jax.Array:
    """Keeps the full model's class on top under the pathway (4a, optional).

    ``mean_i max(0, m_i - (z~_{i,c_i} - max_{k != c_i} z~_{i,k}))``, ``c_i = argmax H(x_i)``,
    ``z~`` the pathway logits. ``m_i = margin``, or with `cap_at_full_margin`
    ``min(margin, full model's own margin)``: an ambiguous input is not pushed to gain
    confidence the full model does not have.
    """
    classes_B = jnp.argmax(full_logits_BxK, axis=-1)
    full_margin_B = jax.lax.stop_gradient(_top_margin(full_logits_BxK, classes_B))
    margin_B = jnp.where(cap_at_full_margin, jnp.minimum(margin, full_margin_B), margin)
    return jnp.mean(jax.nn.relu(margin_B - _top_margin(pathway_logits_BxK, classes_B)))


def kd_budget(
    full_logits_BxK: jax.Array,
    pathway_logits_BxK: jax.Array,
    tau: float | jax.Array,
    budget: float | jax.Array,
) -> jax.Array:
    """Per-instance faithfulness budget (ours, criterion ii): ``mean_i max(0, KL_i - budget)``.

    ``KL_i = tau^2 KL(p_i || p~_i)``. Weighted strongly beside a sparsity term, each input's
    density falls where its own distillation loss reaches the budget, instead of where one
    sparsity weight shared by every input puts it.
    """
    kl_B = tau**2 * kl_rows(full_logits_BxK / tau, pathway_logits_BxK / tau)
    return jnp.mean(jax.nn.relu(kl_B - budget))


def sparsity(scores: Mapping[str, jax.Array] | jax.Array) -> jax.Array:
    """Sparsity (4b): mean score over all neurons of all sites (each site weighted by its size).

    ``mean_i (1/N) sum_n s_{i,n}`` with ``N = sum_l C_l``: the mean of the flattened scores.
    """
    if isinstance(scores, Mapping):
        total = sum(jnp.sum(s) for s in scores.values())
        count = sum(s.size for s in scores.values())
        return total / count
    return jnp.mean(scores)


def pdn_kl(
    full_logits_BxK: jax.Array, q_logits_BxK: jax.Array, tau: float | jax.Array = 1.0
) -> jax.Array:
    """PDN distillation (4c1): ``tau^2 * mean_i KL(softmax(H(x_i)/tau) || softmax(q_i/tau))``."""
    return tau**2 * jnp.mean(kl_rows(full_logits_BxK / tau, q_logits_BxK / tau))


def class_pull(
    scores_flat_BxN: jax.Array,
    bank_KxN: jax.Array,
    pred_classes_B: jax.Array,
    counts_K: jax.Array | None = None,
) -> jax.Array:
    """Same-class pull (4c2): ``mean_i ||s_i - sg(bank[c_i])||^2 / N``.

    With `counts_K`, samples whose class the bank has never seen (count 0) are left out and
    the mean runs over the rest (0 when none is left).
    """
    target_BxN = jax.lax.stop_gradient(bank_KxN[pred_classes_B])
    per_sample_B = jnp.mean(jnp.square(scores_flat_BxN - target_BxN), axis=-1)
    if counts_K is None:
        return jnp.mean(per_sample_B)
    valid_B = (counts_K[pred_classes_B] > 0).astype(per_sample_B.dtype)
    return jnp.sum(valid_B * per_sample_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def bank_ema_update(
    bank_KxN: jax.Array,
    counts_K: jax.Array,
    scores_flat_BxN: jax.Array,
    pred_B: jax.Array,
    decay: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """EMA of the mean scores per predicted class: ``(new_bank_KxN, new_counts_K)``.

    ``m_k`` = mean of ``s_i`` over the batch samples with ``c_i = k``. Class ``k`` present in
    the batch: ``bank_k <- decay * bank_k + (1 - decay) * m_k``, or ``bank_k <- m_k`` on its
    first visit (``counts_k == 0``). Absent classes are unchanged. `counts_K` counts samples.
    """
    scores_flat_BxN = jax.lax.stop_gradient(scores_flat_BxN)
    onehot_BxK = jax.nn.one_hot(pred_B, bank_KxN.shape[0], dtype=scores_flat_BxN.dtype)
    batch_counts_K = jnp.sum(onehot_BxK, axis=0)
    mean_KxN = (onehot_BxK.T @ scores_flat_BxN) / jnp.maximum(batch_counts_K, 1.0)[:, None]
    keep_K = jnp.where(counts_K > 0, decay, 0.0)
    updated_KxN = keep_K[:, None] * bank_KxN + (1.0 - keep_K[:, None]) * mean_KxN
    new_bank_KxN = jnp.where((batch_counts_K > 0)[:, None], updated_KxN, bank_KxN)
    return new_bank_KxN, counts_K + batch_counts_K.astype(counts_K.dtype)


def partner_indices(pred_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each sample, the next sample (cyclically) with a different predicted class.

    Returns ``(idx_B, valid_B)``: ``idx_i = (i + r) mod B`` for the smallest ``r >= 1`` with
    ``pred[idx_i] != pred[i]``; ``valid_i`` is False (and ``idx_i = i``) when no sample of
    another class exists. Deterministic, ``O(B^2)`` memory.
    """
    batch = pred_B.shape[0]
    i_B = jnp.arange(batch)
    shifts_R = jnp.arange(1, batch)
    cand_BxR = (i_B[:, None] + shifts_R[None, :]) % batch
    differs_BxR = pred_B[cand_BxR] != pred_B[:, None]
    valid_B = jnp.any(differs_BxR, axis=-1)
    first_B = jnp.argmax(differs_BxR, axis=-1) if batch > 1 else jnp.zeros_like(i_B)
    idx_B = jnp.where(valid_B, (i_B + 1 + first_B) % batch, i_B)
    return idx_B, valid_B


def leakage_hinge(
    partner_full_logits_BxK: jax.Array,
    partner_gated_logits_BxK: jax.Array,
    classes_c_B: jax.Array,
    valid_mask_B: jax.Array,
    margin: float | jax.Array = 0.0,
) -> jax.Array:
    """No manufactured evidence (4d): a pathway may remove evidence, never create it.

    ``mean_{i valid} max(0, log p_c(x'_i; P(x_i)) - log p_c(x'_i) - margin)`` with ``x'_i``
    the partner of ``x_i`` (`partner_indices`) and ``c = c_i`` the class of ``x_i``. The
    partner's full logits are stop-gradient. 0 when no sample is valid.
    """
    onehot_BxK = jax.nn.one_hot(classes_c_B, partner_full_logits_BxK.shape[-1])
    full_logp = jax.nn.log_softmax(jax.lax.stop_gradient(partner_full_logits_BxK), axis=-1)
    gated_logp = jax.nn.log_softmax(partner_gated_logits_BxK, axis=-1)
    increase_B = jnp.sum(onehot_BxK * (gated_logp - full_logp), axis=-1)
    valid_B = valid_mask_B.astype(increase_B.dtype)
    hinge_B = jax.nn.relu(increase_B - margin) * valid_B
    return jnp.sum(hinge_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def leakage_rank_hinge(
    partner_gated_logits_BxK: jax.Array,
    classes_c_B: jax.Array,
    valid_mask_B: jax.Array,
    margin: float | jax.Array = 1.0,
) -> jax.Array:
    """No manufactured evidence, rank form (4d): ``x``'s class must stay off the top on ``x'``.

    ``mean_{i valid} max(0, z_c(x'_i; P(x_i)) - max_{k != c} z_k(x'_i; P(x_i)) + margin)``:
    penalises only a pathway that brings ``c = c(x_i)`` within `margin` of the top logit on an
    input of another class, not one that merely removes ``x'``'s own evidence.
    """
    hinge_B = jax.nn.relu(_top_margin(partner_gated_logits_BxK, classes_c_B) + margin)
    valid_B = valid_mask_B.astype(hinge_B.dtype)
    return jnp.sum(hinge_B * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def supervised_contrastive(
    masks_BxN: jax.Array, classes_B: jax.Array, temperature: float | jax.Array = 0.1
) -> jax.Array:
    """Class relevance without collapse (4c2, ours): SupCon on (soft) masks.

    With ``u_i = m_i / ||m_i||`` and ``sim_ij = u_i . u_j / temperature``:
    ``mean_{i with positives} -mean_{p: c_p = c_i, p != i} log(exp(sim_ip) /
    sum_{a != i} exp(sim_ia))``. Same-class masks are drawn together and other classes pushed
    apart, relative to each other: no fixed target, so no pull toward early outputs.
    """
    b = masks_BxN.shape[0]
    u_BxN = masks_BxN / jnp.maximum(jnp.linalg.norm(masks_BxN, axis=-1, keepdims=True), 1e-6)
    sim_BxB = (u_BxN @ u_BxN.T) / temperature
    not_self_BxB = 1.0 - jnp.eye(b)
    sim_BxB = jnp.where(not_self_BxB > 0, sim_BxB, -1e9)
    log_prob_BxB = sim_BxB - jax.nn.logsumexp(sim_BxB, axis=-1, keepdims=True)
    pos_BxB = (classes_B[:, None] == classes_B[None, :]) * not_self_BxB
    n_pos_B = pos_BxB.sum(-1)
    per_B = -jnp.sum(pos_BxB * log_prob_BxB, -1) / jnp.maximum(n_pos_B, 1.0)
    has_B = (n_pos_B > 0).astype(per_B.dtype)
    return jnp.sum(per_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)


def mask_bce(scores_BxN: jax.Array, target_masks_BxN: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mask distillation (ours): mean binary cross-entropy of gate scores to 0/1 target masks.

    ``-mean_{i,n} [t log s + (1 - t) log(1 - s)]``, scores clipped to ``[eps, 1 - eps]``. The
    targets (`method/pio.py`) are stop-gradient.
    """
    s = jnp.clip(scores_BxN, eps, 1.0 - eps)
    t = jax.lax.stop_gradient(target_masks_BxN).astype(s.dtype)
    return -jnp.mean(t * jnp.log(s) + (1.0 - t) * jnp.log1p(-s))


def sparsity_ramp(
    step: int | jax.Array, ramp_steps: int | jax.Array, final_weight: float | jax.Array
) -> jax.Array:
    """Linear warm-up of the sparsity weight: ``final * min(1, step / ramp_steps)``.

    ``ramp_steps <= 0`` gives ``final`` from step 0. Works on traced `step`.
    """
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.asarray(ramp_steps, jnp.float32)
    frac = jnp.where(ramp > 0, jnp.clip(step / jnp.maximum(ramp, 1.0), 0.0, 1.0), 1.0)
    return jnp.asarray(final_weight, jnp.float32) * frac


@flax.struct.dataclass
class LossWeights:
    """Weights of the loss terms; pytree leaves, so new values do not recompile a jitted step.

    Ramp the sparsity weight inside the step with
    ``weights.replace(sparsity=sparsity_ramp(step, ramp_steps, weights.sparsity))``.
    """

    kd: jax.Array = 1.0
    hinge: jax.Array = 0.0
    sparsity: jax.Array = 1.0
    pdn: jax.Array = 0.1
    pull: jax.Array = 0.1
    leak: jax.Array = 1.0
    contrast: jax.Array = 0.0
    budget: jax.Array = 0.0
    distill: jax.Array = 0.0
    ranked: jax.Array = 0.0
    ranked_leak: jax.Array = 0.0

    @classmethod
    def create(cls, **weights: float) -> LossWeights:
        """Weights as float32 scalars; unnamed terms keep their defaults."""
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}: the terms are {TERMS}")
        merged = {**{t: getattr(cls(), t) for t in TERMS}, **weights}
        return cls(**{t: jnp.asarray(v, jnp.float32) for t, v in merged.items()})


def total_loss(
    terms: Mapping[str, jax.Array], weights: LossWeights
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = sum_t w_t * term_t`` over `TERMS` (absent terms count 0): ``(loss, aux)``.

    ``aux`` holds ``loss/total``, the unweighted ``loss/<term>`` of each given term and the
    weight used for each, ``weight/<term>``.
    """
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}: the terms are {TERMS}")
    loss = jnp.zeros((), jnp.float32)
    aux = {}
    for name in TERMS:
        if name not in terms:
            continue
        weight = jnp.asarray(getattr(weights, name), jnp.float32)
        loss = loss + weight * terms[name]
        aux[f"loss/{name}"] = terms[name]
        aux[f"weight/{name}"] = weight
    aux["loss/total"] = loss
    return loss, aux
