"""The generator's objective for one batch (docs/METHOD.md §4): every loss term, as one pure
function of the generator, the frozen classifier and the step's hyper-parameters.

Numbers (margins, temperatures, weights) are pytree leaves of `StepHParams` and
`losses.LossWeights`, so changing them never recompiles the step. Which terms exist is decided
once, before jit, from the weights (`LossWeights.active`): a term whose weight is 0 is not
computed at all, and its gated passes are not made.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gencnp_jax.method import losses
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

# The terms that need x' (the partner of another class) gated with x's pathway.
PARTNER_TERMS = ("leak",)
# The terms that gate x (and x') with the top fraction of x's own scores.
RANKED_TERMS = ("ranked", "ranked_leak")


@flax.struct.dataclass
class StepHParams:
    """Numbers the step needs, as pytree leaves: changing them never recompiles.

    Attributes:
      temperature, sigma: DAQ's ``T`` and kernel width.
      tau: distillation temperature.
      hinge_margin: top-1 hinge margin (capped at the full model's own margin).
      leak_margin: margin of the leakage hinge (`losses.leakage_hinge`).
      ramp_steps: steps over which the sparsity weight ramps up from 0.
      ranked_low, ranked_high: the range of the ``ranked`` terms' densities.
    """

    temperature: jax.Array
    sigma: jax.Array
    tau: jax.Array
    hinge_margin: jax.Array
    leak_margin: jax.Array
    ramp_steps: jax.Array
    ranked_low: jax.Array
    ranked_high: jax.Array


def step_weights(weights: losses.LossWeights, step: jax.Array, hp: StepHParams):
    """The weights at `step`: the sparsity weight ramped in."""
    return weights.replace(sparsity=losses.sparsity_ramp(step, hp.ramp_steps, weights.sparsity))


def ranked_densities(batch: int, step: jax.Array, hp: StepHParams) -> jax.Array:
    """The ``ranked`` term's density per row, ``f32[batch]``: a golden-ratio sequence over
    ``[ranked_low, ranked_high)`` that covers the range evenly in every batch and moves on
    each step (a function of the step alone, so a resumed run draws the same densities)."""
    rows = jnp.arange(batch, dtype=jnp.float32) + step.astype(jnp.float32) * batch
    u = jnp.mod(rows * 0.6180339887, 1.0)
    return hp.ranked_low + (hp.ranked_high - hp.ranked_low) * u


def loss_terms(
    model, classifier: FrozenClassifier, batch: dict, hp: StepHParams, terms: tuple[str, ...]
):
    """The loss terms named in `terms` for one batch; one gated pass covers every gating.

    Args:
      model: the generator (``features -> (scores, q_logits)``).
      classifier: the frozen classifier, closed gates taking the run's ablation fills.
      batch: ``images`` and what the full classifier says of them: ``full_logits``, ``pred``,
        the different-class ``partner`` and ``has_partner``; for ``distill``,
        ``target_images`` and ``target_masks`` (PIO masks, `method/pio.py`); for the
        ``ranked`` terms, ``ranked_density`` (``f32[B]``): x gated with the top fraction of its
        own scores at that density must keep the full model's prediction (``ranked``) and must
        not bring x's class near the top on x' (``ranked_leak``).
      hp: the step's hyper-parameters.
      terms: the terms to compute (static: `losses.LossWeights.active`); ``distill`` only
        where the batch holds targets.

    Returns:
      ``(terms, gates, pathway_logits_BxK, scores_flat_BxN)``.
    """
    images, full_logits, pred = batch["images"], batch["full_logits"], batch["pred"]
    partner, has_partner = batch["partner"], batch["has_partner"]
    features = classifier.classify(images)[1]
    scores, q_logits_BxK = model(features)
    settings = daq.Settings(hp.temperature, hp.sigma)
    gates = settings.binarize(scores)
    scores_flat = gates_lib.flatten(scores)
    passes = {"pathway": (images, gates)}
    if any(t in terms for t in PARTNER_TERMS):
        passes["partner"] = (images[partner], gates)  # x' gated with P(x)
    if any(t in terms for t in RANKED_TERMS):  # x, then x', gated with x's top scores
        top = daq.top_fraction(scores_flat, batch["ranked_density"], daq.TOP_FRACTION_WIDTH)
        top = gates_lib.unflatten(top, {s: v.shape[-1] for s, v in scores.items()})
        passes["ranked"] = (images, top)
        passes["ranked_partner"] = (images[partner], top)
    all_logits, _ = classifier.classify(
        jnp.concatenate([x for x, _ in passes.values()]),
        jax.tree.map(lambda *g: jnp.concatenate(g), *[g for _, g in passes.values()]),
    )
    logits = dict(zip(passes, jnp.split(all_logits, len(passes)), strict=True))
    pathway_logits = logits["pathway"]
    compute = {
        "kd": lambda: losses.distillation_kl(full_logits, pathway_logits, hp.tau),
        "hinge": lambda: losses.top1_hinge(full_logits, pathway_logits, hp.hinge_margin),
        "sparsity": lambda: losses.sparsity(settings.soft(scores)),
        "pdn": lambda: losses.pdn_kl(full_logits, q_logits_BxK),
        "leak": lambda: losses.leakage_hinge(logits["partner"], pred, has_partner, hp.leak_margin),
        "ranked": lambda: losses.distillation_kl(full_logits, logits["ranked"], hp.tau),
        "ranked_leak": lambda: losses.leakage_hinge(
            logits["ranked_partner"], pred, has_partner, hp.leak_margin
        ),
        "distill": lambda: losses.mask_bce(
            gates_lib.flatten(model(classifier.classify(batch["target_images"])[1])[0]),
            batch["target_masks"],
        ),
    }
    terms = [t for t in terms if t != "distill" or "target_images" in batch]
    return {t: compute[t]() for t in terms}, gates, pathway_logits, scores_flat
