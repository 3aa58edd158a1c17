"""Fixed-density mask search (ours): the references every method is read against.

How good can a top-d mask be on an image, or one mask shared by a class? A *search* ranks the
channels by free scores, keeps the top ``round(d N)`` (`daq.top_fraction`: the evaluation's
exact top-k in the forward pass, a straight-through gradient at the cut) and minimises
``KL(p(x) || p(x; mask))`` by Adam. The rows of the free scores are images (an instance
search) or classes (a class search, each image reading its class's row). Each row keeps its
own best iterate, judged by the reported metric (the mean relative drop in confidence of the
images it masks), never the batch's mean loss.

The results are yardsticks, not bounds: the search finds local optima, and better masks may
exist. `stages/references.py` builds the instance and class references from these searches.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gencnp_jax.eval import metrics
from gencnp_jax.method import losses
from gencnp_jax.models import daq


@flax.struct.dataclass
class OracleSettings:
    """The optimisation of `search`, as pytree leaves.

    Attributes:
      steps: Adam steps (traced: a while loop; nothing differentiates through it).
      learning_rate: Adam's step size (scores standardised per row make 0.05 a fair scale).
      rel_temperature: `daq.top_fraction`'s gradient width.
    """

    steps: jax.Array
    learning_rate: jax.Array
    rel_temperature: jax.Array


def row_drops(drop_B: jax.Array, assign_BxR: jax.Array) -> jax.Array:
    """``f32[R]``: the mean of each row's images' drops (a row with no image: +inf)."""
    counts_R = assign_BxR.sum(0)
    sums_R = assign_BxR.T @ drop_B
    return jnp.where(counts_R > 0, sums_R / jnp.maximum(counts_R, 1.0), jnp.inf)


def search(
    logits_fn: Callable[[jax.Array], jax.Array],
    full_logits_BxK: jax.Array,
    theta_RxN: jax.Array,
    assign_BxR: jax.Array,
    density: float | jax.Array,
    settings: OracleSettings,
) -> tuple[jax.Array, jax.Array]:
    """Adam on free scores for the top-`density` masks; each row keeps its best iterate.

    Args:
      logits_fn: gates ``f32[B, N]`` (sites in `gates.flatten` order) -> logits ``f32[B, K]``.
      full_logits_BxK: the full model's logits (the target).
      theta_RxN: the free scores, one row per image (``assign`` the identity) or per class.
      assign_BxR: ``f32[B, R]`` one-hot: which row masks each image.
      density: the fraction of channels kept.
      settings: Adam's steps and step size, the cut's gradient width.

    Returns:
      ``(best_theta_RxN, best_drop_R)``: per row the scores whose masks had the lowest mean
      relative drop of its images (the start included: never worse than `theta_RxN`), and
      that drop (``max(0, Y - O) / Y``, a fraction).
    """
    classes_B = jnp.argmax(full_logits_BxK, -1)
    density_B = jnp.full(full_logits_BxK.shape[:1], density, jnp.float32)

    def evaluate(theta):
        masks_BxN = daq.top_fraction(assign_BxR @ theta, density_B, settings.rel_temperature)
        logits = logits_fn(masks_BxN)
        loss = losses.distillation_kl(full_logits_BxK, logits, 1.0)
        drop_B = metrics.relative_drop(full_logits_BxK, jax.lax.stop_gradient(logits), classes_B)
        return loss, row_drops(drop_B, assign_BxR)

    tx = optax.adam(settings.learning_rate)

    def keep_best(theta, drop_R, best, best_drop_R):
        better_R = drop_R < best_drop_R
        return jnp.where(better_R[:, None], theta, best), jnp.where(better_R, drop_R, best_drop_R)

    def body(_, carry):
        theta, opt_state, best, best_drop_R = carry
        (_, drop_R), grads = jax.value_and_grad(evaluate, has_aux=True)(theta)
        best, best_drop_R = keep_best(theta, drop_R, best, best_drop_R)
        updates, opt_state = tx.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, best, best_drop_R

    _, start_drop_R = evaluate(theta_RxN)
    carry = (theta_RxN, tx.init(theta_RxN), theta_RxN, start_drop_R)
    theta, _, best, best_drop_R = jax.lax.fori_loop(0, settings.steps, body, carry)
    _, last_drop_R = evaluate(theta)  # the last update is judged too
    return keep_best(theta, last_drop_R, best, best_drop_R)


def standardise_rows(scores_RxN: jax.Array) -> jax.Array:
    """Each row to mean 0, std 1 (a ranking's scale, so one learning rate suits every row)."""
    mean = jnp.mean(scores_RxN, -1, keepdims=True)
    return (scores_RxN - mean) / (jnp.std(scores_RxN, -1, keepdims=True) + 1e-6)
