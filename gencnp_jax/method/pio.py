"""Per-instance optimised masks (PIO, ours): the teacher the generator distils from.

For each image, channel gates ``g = sigmoid(theta)`` start open and minimise

    KL(p(x) || p(x; g)) + density_weight * mean(g) + leak_weight * rank_leak(x'; g)

(or, with a budget, ``kl_budget_weight * max(0, KL - kl_budget)`` in place of the KL)

by `steps` Adam steps, ``x'`` the next image of the batch with another predicted class
(`losses.partner_indices`) and ``rank_leak`` the rank hinge of the generator's objective
(`losses.leakage_rank_hinge`): the mask must keep x's prediction, be sparse, and not lift x's
class to the top of another class's input. The target mask is ``theta > 0``.

Unlike CDRP (`eval/baselines.cdrp`) it optimises a sparsity/faithfulness trade-off chosen for
each instance *with the leakage guard*; it costs ``steps`` gated passes per image, which is
why the generator learns it instead of running it at explanation time.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gencnp_jax.method import losses
from gencnp_jax.models import gates as gates_lib


@flax.struct.dataclass
class PioHParams:
    """The optimiser's numbers, as pytree leaves (new values do not recompile).

    Attributes:
      steps: Adam steps per image (a traced bound: a while loop, nothing differentiates it).
      learning_rate: Adam's step size on the gate logits.
      density_weight: weight of the mean gate (sparsity).
      leak_weight, leak_margin: weight and margin of the rank leakage hinge.
      init_logit: the gate logits' start (3.0: sigmoid 0.95, every gate open).
      kl_budget, kl_budget_weight: with ``kl_budget > 0`` the KL term becomes
        ``kl_budget_weight * mean_i max(0, KL_i - kl_budget)``: each image is made as sparse
        as its own budget allows, instead of one KL/density trade-off shared by every image.
    """

    steps: jax.Array
    learning_rate: jax.Array
    density_weight: jax.Array
    leak_weight: jax.Array
    leak_margin: jax.Array
    init_logit: jax.Array
    kl_budget: jax.Array
    kl_budget_weight: jax.Array

    @classmethod
    def create(cls, **values: float) -> PioHParams:
        steps = jnp.asarray(values.pop("steps"), jnp.int32)
        return cls(steps=steps, **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def optimise_masks(classify: Callable, images: jax.Array, hp: PioHParams) -> dict:
    """PIO masks of a batch and how the full model and the masks answer.

    Args:
      classify: ``(images, gates=None) -> (logits, features)``, the frozen classifier with the
        run's ablation fills bound.
      images: ``f32[B, H, W, C]`` normalised images.
      hp: the optimiser's numbers.

    Returns:
      ``masks_flat`` f32[B, N] (0/1, sites in `gates_lib.flatten` order), ``full_logits``,
      ``pathway_logits`` (x under its mask), ``partner_logits`` (x' under x's mask),
      ``classes``, ``partner_classes``, ``has_partner``.
    """
    full_logits, features = classify(images)
    full_logits = jax.lax.stop_gradient(full_logits)
    pred = jnp.argmax(full_logits, -1)
    partner, has_partner = losses.partner_indices(pred)
    both_images = jnp.concatenate([images, images[partner]])
    doubled = lambda tree: jax.tree.map(lambda g: jnp.concatenate([g, g]), tree)

    def objective(theta):
        gates = jax.tree.map(jax.nn.sigmoid, theta)
        pathway, partner_logits = jnp.split(classify(both_images, doubled(gates))[0], 2)
        kl = jnp.where(
            hp.kl_budget > 0,
            hp.kl_budget_weight * losses.kd_budget(full_logits, pathway, 1.0, hp.kl_budget),
            losses.distillation_kl(full_logits, pathway, 1.0),
        )
        leak = losses.leakage_rank_hinge(partner_logits, pred, has_partner, hp.leak_margin)
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
    pathway, partner_logits = jnp.split(classify(both_images, doubled(masks))[0], 2)
    return {
        "masks_flat": gates_lib.flatten(masks),
        "full_logits": full_logits,
        "pathway_logits": pathway,
        "partner_logits": partner_logits,
        "classes": pred,
        "partner_classes": pred[partner],
        "has_partner": has_partner,
    }
