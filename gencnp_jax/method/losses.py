"""The generator's training objective (docs/METHOD.md §4) as pure functions of logits and scores.

Every term returns a scalar; `total_loss` weights them with a `LossWeights` pytree.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp

TERMS = ("kd", "hinge", "sparsity", "pdn", "leak", "distill", "rank", "ranked")


def masked_mean(
    values_B: jax.Array, weights_B: jax.Array | None = None, empty: float = float("nan")
) -> jax.Array:
    """``sum(v * w) / sum(w)`` over rows with ``w > 0`` (others ignored, even NaN); `empty`
    when no weight is positive (NaN for a metric, 0 for a loss term). The one masked mean of
    the package: losses and metrics (`eval.metrics`) both use it."""
    if weights_B is None:
        weights_B = jnp.ones(values_B.shape[:1], jnp.float32)
    w_B = weights_B.astype(jnp.float32)
    total = jnp.sum(w_B)
    summed = jnp.sum(jnp.where(w_B > 0, values_B * w_B, 0.0))
    return jnp.where(total > 0, summed / jnp.where(total > 0, total, 1.0), empty)


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
    full_logits_BxK: jax.Array, pathway_logits_BxK: jax.Array, margin: float | jax.Array
) -> jax.Array:
    """Keeps the full model's class on top under the pathway (4a).

    ``mean_i max(0, m_i - (z~_{i,c_i} - max_{k != c_i} z~_{i,k}))``, ``c_i = argmax H(x_i)``,
    ``z~`` the pathway logits, ``m_i = min(margin, full model's own margin)``: an ambiguous
    input is not pushed to gain confidence the full model does not have.
    """
    classes_B = jnp.argmax(full_logits_BxK, axis=-1)
    full_margin_B = jax.lax.stop_gradient(_top_margin(full_logits_BxK, classes_B))
    margin_B = jnp.minimum(margin, full_margin_B)
    return jnp.mean(jax.nn.relu(margin_B - _top_margin(pathway_logits_BxK, classes_B)))


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
    partner_gated_logits_BxK: jax.Array,
    classes_c_B: jax.Array,
    valid_mask_B: jax.Array,
    margin: float | jax.Array,
) -> jax.Array:
    """No manufactured evidence (4d): ``x``'s class must stay off the top on ``x'``.

    ``mean_{i valid} max(0, z_c(x'_i; P(x_i)) - max_{k != c} z_k(x'_i; P(x_i)) + margin)``:
    penalises only a pathway that brings ``c = c(x_i)`` within `margin` of the top logit on an
    input of another class, not one that merely removes ``x'``'s own evidence.
    """
    hinge_B = jax.nn.relu(_top_margin(partner_gated_logits_BxK, classes_c_B) + margin)
    return masked_mean(hinge_B, valid_mask_B, empty=0.0)


def mask_bce(scores_BxN: jax.Array, target_masks_BxN: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mask distillation (ours): mean binary cross-entropy of gate scores to 0/1 target masks.

    ``-mean_{i,n} [t log s + (1 - t) log(1 - s)]``, scores clipped to ``[eps, 1 - eps]``. The
    targets (`method/pio.py`) are stop-gradient.
    """
    s = jnp.clip(scores_BxN, eps, 1.0 - eps)
    t = jax.lax.stop_gradient(target_masks_BxN).astype(s.dtype)
    return -jnp.mean(t * jnp.log(s) + (1.0 - t) * jnp.log1p(-s))


def listnet(student_logits_BxN: jax.Array, teacher_logits_BxN: jax.Array) -> jax.Array:
    """Listwise ranking distillation (ours, after ListNet): the mean over rows of
    ``KL(softmax(z(t)) || softmax(z(s)))``, ``z`` each row standardised to mean 0 and std 1.

    The standardisation makes the term blind to each row's offset and scale, so it asks only
    for the teacher's order (the top of it most: softmax weighs it); 0 when ``z(s) = z(t)``.
    The teacher (PIO's optimised gate logits) is stop-gradient.
    """

    def z(x_BxN):
        x_BxN = x_BxN - jnp.mean(x_BxN, -1, keepdims=True)
        return x_BxN / (jnp.std(x_BxN, -1, keepdims=True) + 1e-6)

    log_p = jax.nn.log_softmax(z(jax.lax.stop_gradient(teacher_logits_BxN)), -1)
    log_q = jax.nn.log_softmax(z(student_logits_BxN), -1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))


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

    Every term's weight is required (the config holds the defaults). Ramp the sparsity
    weight inside the step with
    ``weights.replace(sparsity=sparsity_ramp(step, ramp_steps, weights.sparsity))``.
    """

    kd: jax.Array
    hinge: jax.Array
    sparsity: jax.Array
    pdn: jax.Array
    leak: jax.Array
    distill: jax.Array
    rank: jax.Array
    ranked: jax.Array

    @classmethod
    def create(cls, **weights: float) -> LossWeights:
        """Weights as float32 scalars, one for every term of `TERMS`."""
        unknown = sorted(set(weights) - set(TERMS))
        missing = sorted(set(TERMS) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"loss weights: unknown terms {unknown}, missing terms {missing}; the terms "
                f"are {TERMS}"
            )
        return cls(**{t: jnp.asarray(weights[t], jnp.float32) for t in TERMS})

    def active(self) -> tuple[str, ...]:
        """The terms with a positive weight, in `TERMS` order: the only ones a step builds.

        Host-side: call it on concrete weights, before jit.
        """
        return tuple(t for t in TERMS if float(getattr(self, t)) > 0)


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
