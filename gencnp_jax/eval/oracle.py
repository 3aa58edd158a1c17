"""Fixed-density optima (ours): how much better can a per-instance mask be than a per-class one?

`specificity_gain` (`controls`) asks a method to beat the one-mask-per-class control at the same
density. How far any method *can* beat it depends on the classifier: these optima bound it.
Both rank the channels by free scores, keep the top ``round(d N)`` of them
(`daq.top_fraction`: the evaluation's exact top-k forward, a straight-through backward at the
cut) and minimise ``KL(p(x) || p(x; mask))`` by Adam:

* the *class optimum* has one score vector per predicted class, shared by its images;
* the *instance optimum* has one per image.

``mDC(class optimum) / mDC(instance optimum)`` is the headroom: the specificity gain a perfect
instance-specific explainer would show over the best class mask on these images (both are fit
to the images they are scored on, so neither is a method; they are yardsticks).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gencnp_jax.method import losses
from gencnp_jax.models import daq


def top_fraction_kl(
    logits_fn: Callable[[jax.Array], jax.Array],
    full_logits_BxK: jax.Array,
    scores_BxN: jax.Array,
    density: float | jax.Array,
    rel_temperature: float | jax.Array,
) -> jax.Array:
    """``mean_i KL(p(x_i) || p(x_i; top-d of scores_i))`` (tau 1): what the optima minimise.

    `logits_fn` maps ``f32[B, N]`` 0/1 gates (sites in `gates.flatten` order) to the gated
    classifier's ``f32[B, K]`` logits of the batch.
    """
    density_B = jnp.full(scores_BxN.shape[:1], density, jnp.float32)
    masks_BxN = daq.top_fraction(scores_BxN, density_B, rel_temperature)
    return losses.distillation_kl(full_logits_BxK, logits_fn(masks_BxN), 1.0)


@flax.struct.dataclass
class OracleSettings:
    """The optimisation of `optimise_ranking`, as pytree leaves.

    Attributes:
      steps: Adam steps (traced: a while loop; nothing differentiates through it).
      learning_rate: Adam's step size (scores standardised per row make 0.05 a fair scale).
      rel_temperature: `daq.top_fraction`'s gradient width.
    """

    steps: jax.Array
    learning_rate: jax.Array
    rel_temperature: jax.Array


def optimise_ranking(
    logits_fn: Callable[[jax.Array], jax.Array],
    full_logits_BxK: jax.Array,
    theta: jax.Array,
    expand: Callable[[jax.Array], jax.Array],
    density: float | jax.Array,
    settings: OracleSettings,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Adam on free scores ``theta`` for the top-`density` masks of the batch.

    Args:
      logits_fn: gates ``f32[B, N] -> logits f32[B, K]`` (see `top_fraction_kl`).
      full_logits_BxK: the full model's logits (the target).
      theta: the free scores, any shape `expand` maps to ``f32[B, N]``: ``f32[B, N]`` with
        ``expand = identity`` (instance optimum), or ``f32[K, N]`` with
        ``expand = lambda t: onehot_BxK @ t`` (class optimum).
      density: the fraction of channels kept.
      settings: Adam's steps and step size, the cut's gradient width.

    Returns:
      ``(best_theta, start_loss, best_loss)``: the scores of the lowest loss seen (the start
      included, so the result is never worse than `theta`), and the two losses.
    """
    loss_fn = lambda t: top_fraction_kl(
        logits_fn, full_logits_BxK, expand(t), density, settings.rel_temperature
    )
    tx = optax.adam(settings.learning_rate)

    def body(_, carry):
        theta, opt_state, best, best_loss = carry
        loss, grads = jax.value_and_grad(loss_fn)(theta)
        better = loss < best_loss
        best = jnp.where(better, theta, best)
        best_loss = jnp.minimum(loss, best_loss)
        updates, opt_state = tx.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, best, best_loss

    start_loss = loss_fn(theta)
    carry = (theta, tx.init(theta), theta, start_loss)
    theta, _, best, best_loss = jax.lax.fori_loop(0, settings.steps, body, carry)
    last_loss = loss_fn(theta)  # the last update is scored too
    best = jnp.where(last_loss < best_loss, theta, best)
    return best, start_loss, jnp.minimum(last_loss, best_loss)


def standardise_rows(scores_RxN: jax.Array) -> jax.Array:
    """Each row to mean 0, std 1 (a ranking's scale, so one learning rate suits every row)."""
    mean = jnp.mean(scores_RxN, -1, keepdims=True)
    return (scores_RxN - mean) / (jnp.std(scores_RxN, -1, keepdims=True) + 1e-6)
