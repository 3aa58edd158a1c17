"""The generator's objective for one batch (docs/METHOD.md §4): every loss term, as one pure
function of the generator, the frozen classifier and the step's hyper-parameters.

The objective's options (docs/METHOD.md §4) are pytree leaves of `StepHParams` (0/1 switches
and numbers), so switching them never recompiles the step.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from gencnp_jax.method import losses
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib

LEAK_FORMS = ("log_ratio", "rank")  # config.generator.loss.leak_form
SPARSITY_ON = ("scores", "daq_soft")  # config.generator.loss.sparsity_on


@flax.struct.dataclass
class StepHParams:
    """Numbers the step needs, as pytree leaves: changing them never recompiles.

    Attributes:
      temperature, sigma: DAQ's ``T`` and kernel width.
      tau: distillation temperature.
      hinge_margin: top-1 hinge margin; `hinge_cap` = 1 caps it at the full model's margin.
      leak_margin: margin of the leakage hinge; `leak_rank` = 1 takes its rank form
        (`losses.leakage_rank_hinge`), 0 the log-ratio form (`losses.leakage_hinge`).
      ramp_steps: steps over which the sparsity weight ramps up from 0.
      bank_decay: EMA decay of the class-score bank of the pull term.
      sparsity_soft: 1 = sparsity on DAQ's soft value (its forward value is the density;
        no push into sigmoid saturation), 0 = on the raw scores.
      kd_budget: per-instance distillation budget of the ``budget`` term.
      contrast_temperature: temperature of the supervised contrastive term.
      contrast_start: step from which the contrastive term counts (warm-up before it).
      ranked_temperature: width of `daq.top_fraction`'s gradient, in units of each row's
        score spread (the ``ranked`` term).
      ranked_low, ranked_high: the range of the ``ranked`` term's densities.
    """

    temperature: jax.Array
    sigma: jax.Array
    tau: jax.Array
    hinge_margin: jax.Array
    leak_margin: jax.Array
    ramp_steps: jax.Array
    bank_decay: jax.Array
    hinge_cap: jax.Array
    leak_rank: jax.Array
    sparsity_soft: jax.Array
    kd_budget: jax.Array
    contrast_temperature: jax.Array
    contrast_start: jax.Array
    ranked_temperature: jax.Array
    ranked_low: jax.Array
    ranked_high: jax.Array


def step_weights(weights: losses.LossWeights, step: jax.Array, hp: StepHParams):
    """The weights at `step`: sparsity ramped in, the contrastive term off before its start."""
    return weights.replace(
        sparsity=losses.sparsity_ramp(step, hp.ramp_steps, weights.sparsity),
        contrast=jnp.where(step >= hp.contrast_start, weights.contrast, 0.0),
    )


def ranked_densities(batch: int, step: jax.Array, hp: StepHParams) -> jax.Array:
    """The ``ranked`` term's density per row, ``f32[batch]``: a golden-ratio sequence over
    ``[ranked_low, ranked_high)`` that covers the range evenly in every batch and moves on
    each step (a function of the step alone, so a resumed run draws the same densities)."""
    rows = jnp.arange(batch, dtype=jnp.float32) + step.astype(jnp.float32) * batch
    u = jnp.mod(rows * 0.6180339887, 1.0)
    return hp.ranked_low + (hp.ranked_high - hp.ranked_low) * u


def loss_terms(model, classify: Callable, batch: dict, bank, hp: StepHParams):
    """Every loss term for one batch; one gated pass covers ``x`` and its partners ``x'``.

    Args:
      model: the generator (``features -> (scores, q_logits)``).
      classify: ``(images, gates=None) -> (logits, features)``, the frozen classifier, closed
        gates taking the run's ablation fills.
      batch: ``images`` and what the full classifier says of them: ``full_logits``, ``pred``,
        the different-class ``partner`` and ``has_partner``; with ``target_images`` and
        ``target_masks`` (PIO masks, `method/pio.py`) also the ``distill`` term; with
        ``ranked_density`` (``f32[B]``) also the ``ranked`` terms: x gated with the top
        fraction of its own scores at that density must keep the full model's prediction
        (``ranked``) and must not bring x's class near the top on x' (``ranked_leak``).
      bank: the class-score bank of the pull term (``scores f32[K, N]``, ``counts f32[K]``).
      hp: the step's hyper-parameters.

    Returns:
      ``(terms, gates, pathway_logits_BxK, scores_flat_BxN)``.
    """
    images, full_logits, pred = batch["images"], batch["full_logits"], batch["pred"]
    partner, has_partner = batch["partner"], batch["has_partner"]
    features = classify(images)[1]
    scores, q_logits_BxK = model(features)
    gates = daq.binarize_tree(scores, hp.temperature, hp.sigma)
    scores_flat = gates_lib.flatten(scores)
    passes = [(images, gates), (images[partner], gates)]  # x, then x' gated with P(x)
    if "ranked_density" in batch:  # x, then x', gated with x's top scores at a fixed density
        top = daq.top_fraction(scores_flat, batch["ranked_density"], hp.ranked_temperature)
        top = gates_lib.unflatten(top, {s: v.shape[-1] for s, v in scores.items()})
        passes += [(images, top), (images[partner], top)]
    all_logits, _ = classify(
        jnp.concatenate([x for x, _ in passes]),
        jax.tree.map(lambda *g: jnp.concatenate(g), *[g for _, g in passes]),
    )
    pathway_logits, partner_logits, *ranked = jnp.split(all_logits, len(passes))
    soft = daq.daq_soft_tree(scores, hp.temperature, hp.sigma)
    sparsity = jnp.where(hp.sparsity_soft > 0, losses.sparsity(soft), losses.sparsity(scores))
    leak_log = losses.leakage_hinge(
        full_logits[partner], partner_logits, pred, has_partner, hp.leak_margin
    )
    leak_rank = losses.leakage_rank_hinge(partner_logits, pred, has_partner, hp.leak_margin)
    terms = {
        "kd": losses.distillation_kl(full_logits, pathway_logits, hp.tau),
        "hinge": losses.top1_hinge(full_logits, pathway_logits, hp.hinge_margin, hp.hinge_cap > 0),
        "sparsity": sparsity,
        "pdn": losses.pdn_kl(full_logits, q_logits_BxK),
        "pull": losses.class_pull(scores_flat, bank.scores, pred, bank.counts),
        "leak": jnp.where(hp.leak_rank > 0, leak_rank, leak_log),
        "contrast": losses.supervised_contrastive(scores_flat, pred, hp.contrast_temperature),
        "budget": losses.kd_budget(full_logits, pathway_logits, hp.tau, hp.kd_budget),
    }
    if ranked:
        terms["ranked"] = losses.distillation_kl(full_logits, ranked[0], hp.tau)
        terms["ranked_leak"] = losses.leakage_rank_hinge(
            ranked[1], pred, has_partner, hp.leak_margin
        )
    if "target_images" in batch:
        target_scores, _ = model(classify(batch["target_images"])[1])
        terms["distill"] = losses.mask_bce(gates_lib.flatten(target_scores), batch["target_masks"])
    return terms, gates, pathway_logits, scores_flat
