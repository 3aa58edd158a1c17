"""Per-instance optimised masks (PIO, ours): the teacher the generator distils from.

For each image, channel gates ``g = sigmoid(theta)`` start open and minimise

    KL(p(x) || p(x; g)) + density_weight * mean(g) + leak_weight * leak(x'; g)

by `steps` Adam steps, ``x'`` the next image of the batch with another predicted class
(`losses.partner_indices`) and ``leak`` the leakage hinge of the generator's objective
(`losses.leakage_hinge`): the mask must keep x's prediction, be sparse, and not lift x's
class to the top of another class's input. The target mask is ``theta > 0``.

Unlike CDRP (`eval/baselines.cdrp`) it optimises a sparsity/faithfulness trade-off chosen for
each instance *with the leakage guard*; it costs ``steps`` gated passes per image, which is
why the generator learns it instead of running it at explanation time.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gencnp_jax.method import losses
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

INIT_LOGIT = 3.0  # every gate logit's start: sigmoid(3) = 0.95, every gate open
TRIM_STEP = 0.02  # `sparsest_cuts`' density grid: 0.02, 0.04, ..., 1


@flax.struct.dataclass
class PioHParams:
    """The optimiser's numbers, as pytree leaves (new values do not recompile).

    Attributes:
      steps: Adam steps per image (a traced bound: a while loop, nothing differentiates it).
      learning_rate: Adam's step size on the gate logits.
      density_weight: weight of the mean gate (sparsity).
      leak_weight, leak_margin: weight and margin of the rank leakage hinge.
      init_logit: the gate logits' start (`INIT_LOGIT`).
    """

    steps: jax.Array
    learning_rate: jax.Array
    density_weight: jax.Array
    leak_weight: jax.Array
    leak_margin: jax.Array
    init_logit: jax.Array

    @classmethod
    def create(cls, **values: float) -> PioHParams:
        steps = jnp.asarray(values.pop("steps"), jnp.int32)
        return cls(steps=steps, **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def optimise_masks(classifier: FrozenClassifier, images: jax.Array, hp: PioHParams) -> dict:
    """PIO masks of a batch and how the full model and the masks answer.

    Args:
      classifier: the frozen classifier with the run's ablation fills.
      images: ``f32[B, H, W, C]`` normalised images.
      hp: the optimiser's numbers.

    Returns:
      ``masks_flat`` f32[B, N] (0/1, sites in `gates_lib.flatten` order), ``logits_flat``
      f32[B, N] (the optimised gate logits, whose sign is the mask), ``full_logits``,
      ``pathway_logits`` (x under its mask), ``partner_logits`` (x' under x's mask),
      ``classes``, ``partner_classes``, ``has_partner``.
    """
    full_logits, features = classifier.classify(images)
    full_logits = jax.lax.stop_gradient(full_logits)
    pred = jnp.argmax(full_logits, -1)
    partner, has_partner = losses.partner_indices(pred)
    partner_images = images[partner]
    pathways = lambda gates: classifier.logits_of_passes(
        [(images, gates), (partner_images, gates)]
    )  # (x, x') under x's gates

    def objective(theta):
        gates = jax.tree.map(jax.nn.sigmoid, theta)
        pathway, partner_logits = pathways(gates)
        kl = losses.distillation_kl(full_logits, pathway, 1.0)
        leak = losses.leakage_hinge(partner_logits, pred, has_partner, hp.leak_margin)
        density = jnp.mean(gates_lib.flatten(gates))
        return kl + hp.density_weight * density + hp.leak_weight * leak

    tx = optax.adam(hp.learning_rate)
    theta = {s: jnp.full(f.shape[:1] + f.shape[-1:], hp.init_logit) for s, f in features.items()}

    def body(_, carry):
        theta, opt_state = carry
        updates, opt_state = tx.update(jax.grad(objective)(theta), opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    theta, _ = jax.lax.fori_loop(0, hp.steps, body, (theta, tx.init(theta)))
    masks = jax.tree.map(lambda t: (t > 0).astype(jnp.float32), theta)
    pathway, partner_logits = pathways(masks)
    return {
        "masks_flat": gates_lib.flatten(masks),
        "logits_flat": gates_lib.flatten(theta),
        "full_logits": full_logits,
        "pathway_logits": pathway,
        "partner_logits": partner_logits,
        "classes": pred,
        "partner_classes": pred[partner],
        "has_partner": has_partner,
    }


def sparsest_cuts(
    classifier: FrozenClassifier,
    images: jax.Array,
    logits_flat: jax.Array,
    densities_G: jax.Array,
    kl_budget: jax.Array,
) -> dict:
    """Trims each image's mask to the sparsest faithful prefix of its gate-logit ranking.

    For each density ``d`` of the ascending grid `densities_G`, the mask keeps the
    ``round(d N)`` highest logits of the image. The image's density is the smallest grid ``d``
    from which on every grid density keeps its predicted class with ``KL(p || p~) <=
    kl_budget`` and does not make it the top class of the partner image ``x'`` (the leakage
    guard of `optimise_masks`); the grid's last if none. Its cut is the
    logit half way between the last kept and the first dropped neuron, so the mask is
    ``logits_flat > cut``.

    Returns:
      ``cuts`` f32[B], ``masks_flat``, ``pathway_logits`` and ``partner_logits`` of the trimmed
      masks (the partners of `optimise_masks`).
    """
    full_logits = classifier.logits(images)
    site_channels = classifier.site_channels
    pred = jnp.argmax(full_logits, -1)
    partner, has_partner = losses.partner_indices(pred)
    partner_images = images[partner]
    n = logits_flat.shape[-1]
    desc_BxN = -jnp.sort(-logits_flat, -1)
    below_BxN = jnp.concatenate([desc_BxN[:, 1:], desc_BxN[:, -1:] - 1.0], -1)
    cuts_BxN = 0.5 * (desc_BxN + below_BxN)  # cut after the k-th highest, k = 1..N

    def pathways(kept_BxN):  # (x, x') under x's mask
        gates = gates_lib.unflatten(kept_BxN, site_channels)
        return classifier.logits_of_passes([(images, gates), (partner_images, gates)])

    def faithful_at(d):
        k = jnp.clip(jnp.round(d * n).astype(jnp.int32), 1, n)
        cut_B = cuts_BxN[:, k - 1]
        pathway, partner_logits = pathways((logits_flat > cut_B[:, None]).astype(jnp.float32))
        kept_B = (jnp.argmax(pathway, -1) == pred) & (
            losses.kl_rows(full_logits, pathway) <= kl_budget
        )
        leaks_B = has_partner & (jnp.argmax(partner_logits, -1) == pred)
        return kept_B & ~leaks_B, cut_B

    ok_GxB, cut_GxB = jax.lax.map(faithful_at, densities_G)
    ok_from_GxB = jnp.flip(jnp.cumprod(jnp.flip(ok_GxB, 0), 0), 0).astype(bool)
    first_B = jnp.where(ok_from_GxB.any(0), jnp.argmax(ok_from_GxB, 0), len(densities_G) - 1)
    cuts_B = cut_GxB[first_B, jnp.arange(len(first_B))]
    masks_flat = (logits_flat > cuts_B[:, None]).astype(jnp.float32)
    pathway, partner_logits = pathways(masks_flat)
    return {
        "cuts": cuts_B,
        "masks_flat": masks_flat,
        "pathway_logits": pathway,
        "partner_logits": partner_logits,
    }
