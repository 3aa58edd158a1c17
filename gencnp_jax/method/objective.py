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

from gencnp_jax.method import evidence, losses
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

# The terms that need x' (the partner of another class) gated with x's pathway.
PARTNER_TERMS = ("leak",)
# The terms that read the PIO targets, and the batch entry each needs (besides the targets'
# reading, ``target_pools`` and ``target_fo``).
TARGET_TERMS = {"distill": "target_masks", "rank": "teacher_logits"}


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


def read(model, classifier: FrozenClassifier, images_BxHxWxC: jax.Array):
    """``(full_logits f32[B, K], pools, fo)``: what the generator `model` reads of the images
    (its `pools` of the clean features, and the first-order effects when it reads them, else
    None), in one forward pass of the classifier (and one backward pass for ``fo``)."""
    full_logits_BxK, features, fo = evidence.read(classifier, images_BxHxWxC, model.grad_evidence)
    return full_logits_BxK, model.pools(features), fo


def batch_of(model, classifier: FrozenClassifier, images_BxHxWxC: jax.Array) -> dict:
    """The batch entries every term reads, from one `read` of the images: ``images``,
    ``full_logits``, ``pred``, the different-class ``partner`` and ``has_partner``,
    ``pools`` and ``fo``."""
    full_logits, pools, fo = read(model, classifier, images_BxHxWxC)
    pred = jnp.argmax(full_logits, -1)
    partner, has_partner = losses.partner_indices(pred)
    return dict(
        images=images_BxHxWxC, full_logits=full_logits, pred=pred, partner=partner,
        has_partner=has_partner, pools=pools, fo=fo,
    )  # fmt: skip


def loss_terms(
    model, classifier: FrozenClassifier, batch: dict, hp: StepHParams, terms: tuple[str, ...]
):
    """The loss terms named in `terms` for one batch; one gated pass covers every gating.

    Args:
      model: the generator (`models.generator.Generator`).
      classifier: the frozen classifier, closed gates taking the run's ablation fills.
      batch: `batch_of` the images; for ``distill``, ``target_masks`` (PIO masks,
        `method/pio.py`), and for ``rank`` ``teacher_logits`` (PIO's gate logits, whose order
        the generator's ranking learns, `losses.listnet`), with the targets' images read by
        `read` (``target_pools``, ``target_fo``: the classifier is frozen, so a training loop
        reads them once); for ``ranked``, ``ranked_density`` (``f32[B]``): x gated with the
        top fraction of its own ranking at that density must keep the full model's prediction.
      hp: the step's hyper-parameters.
      terms: the terms to compute (static: `losses.LossWeights.active`); ``distill`` and
        ``rank`` only where the batch holds targets.

    Returns:
      ``(terms, gates, pathway_logits_BxK, scores_flat_BxN)``.
    """
    images, full_logits, pred = batch["images"], batch["full_logits"], batch["pred"]
    partner, has_partner = batch["partner"], batch["has_partner"]
    out = model.outputs_from_pools(batch["pools"], batch["fo"])
    scores = {s: jax.nn.sigmoid(v) for s, v in out["gate"].items()}
    q_logits_BxK = out["q"]
    settings = daq.Settings(hp.temperature, hp.sigma)
    gates = settings.binarize(scores)
    scores_flat = gates_lib.flatten(scores)
    passes = {"pathway": (images, gates)}
    if any(t in terms for t in PARTNER_TERMS):
        passes["partner"] = (images[partner], gates)  # x' gated with P(x)
    if "ranked" in terms:  # x gated with the top of its own ranking (logits: sigmoids tie)
        ranking = gates_lib.flatten(out["gate"] if out["rank"] is None else out["rank"])
        top = daq.top_fraction(ranking, batch["ranked_density"], daq.TOP_FRACTION_WIDTH)
        passes["ranked"] = (images, gates_lib.unflatten(top, model.site_channels))
    logits = dict(zip(passes, classifier.logits_of_passes(list(passes.values())), strict=True))
    pathway_logits = logits["pathway"]
    compute = {
        "kd": lambda: losses.distillation_kl(full_logits, pathway_logits, hp.tau),
        "hinge": lambda: losses.top1_hinge(full_logits, pathway_logits, hp.hinge_margin),
        "sparsity": lambda: losses.sparsity(settings.soft(scores)),
        "pdn": lambda: losses.pdn_kl(full_logits, q_logits_BxK),
        "leak": lambda: losses.leakage_hinge(logits["partner"], pred, has_partner, hp.leak_margin),
        "ranked": lambda: losses.distillation_kl(full_logits, logits["ranked"], hp.tau),
    }
    terms = [t for t in terms if t not in TARGET_TERMS or TARGET_TERMS[t] in batch]
    if any(t in terms for t in TARGET_TERMS):  # one generator pass over the targets
        target = model.outputs_from_pools(batch["target_pools"], batch["target_fo"])
        compute["distill"] = lambda: losses.mask_bce(
            jax.nn.sigmoid(gates_lib.flatten(target["gate"])), batch["target_masks"]
        )
        target_ranking = target["gate"] if target["rank"] is None else target["rank"]
        compute["rank"] = lambda: losses.listnet(
            gates_lib.flatten(target_ranking), batch["teacher_logits"]
        )
    return {t: compute[t]() for t in terms}, gates, pathway_logits, scores_flat
