"""Distance-aware quantization (DAQ, Kim, Lee, Ham, ICCV 2021) of scores to binary gates.

Forward values are exact 0/1 (no train/test gap); gradients flow to the scores through DASR.
`top_fraction` binarizes at a given density instead of at 0.5, with a straight-through gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp


def corrected_levels(temperature: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """The corrected 1-bit levels ``(-1/(e^T - 1), 1 + 1/(e^T - 1))`` of DASR.

    With the nearest level weighted by ``sigmoid(T)`` and the other by ``sigmoid(-T)``,
    these levels make the soft value land exactly on 0 or 1.
    """
    delta = 1.0 / jnp.expm1(jnp.asarray(temperature, jnp.float32))
    return -delta, 1.0 + delta


def daq_soft(
    s: jax.Array,
    temperature: float | jax.Array,
    sigma: float | jax.Array,
    eps: float = 1e-8,
) -> jax.Array:
    """1-bit distance-aware soft rounding (DASR) of scores ``s`` in ``[0, 1]``.

    With levels ``q = (0, 1)``, nearest level ``n = 1[s > 0.5]`` (= ``round(s)`` on
    ``[0, 1]``) and the other level ``f = 1 - n``:

    - distance scores (similarities) ``phi_i = 1 - |s - q_i|``, i.e. ``(1 - s, s)``;
    - kernel soft argmax: a Gaussian kernel over the levels centred on the nearest one,
      ``k_i = exp(-(q_i - q_n)^2 / (2 sigma^2))`` (so ``k_n = 1``, ``k_f = exp(-1/(2 sigma^2))``),
      logits ``g_i = k_i * phi_i``;
    - adaptive temperature ``beta = sg(T / (|g_n - g_f| + eps))`` (sg = stop-gradient),
      weights ``w = softmax(beta * g)``;
    - corrected levels ``qh = (-d, 1 + d)``, ``d = 1 / (e^T - 1)``; output ``sum_i w_i qh_i``.

    Because ``beta`` rescales the logit gap to exactly ``T``, the nearest level always gets
    weight ``sigmoid(T)``, and ``qh_n sigmoid(T) + qh_f sigmoid(-T) = q_n``: the forward value is
    ``round(s)`` up to float error. The gradient is
    ``ds~/ds = (1 + 2d) sigmoid(T) sigmoid(-T) T (1 + k_f) / (|g_n - g_f| + eps)``, positive and
    finite on ``[0, 1]``: ``|g_n - g_f| >= (1 - k_f) / 2 > 0``, its minimum at ``s -> 0.5``.

    Our choice (the paper's text was not at hand): similarities ``1 - |s - q|`` rather than
    negative distances. With negative distances the kernel (``k_f < 1``) shrinks the far
    level's *penalty*, which flips the argmax for ``s`` within ~0.03 of 0.5 and breaks
    ``soft == round``; with positive similarities it only widens the gap. It also keeps the
    gap away from zero at ``s = 0.5``, so ``eps`` only matters when ``sigma -> inf``.

    Args:
      s: scores, any shape, values in ``[0, 1]`` (e.g. sigmoid outputs).
      temperature: ``T`` > 0; larger = sharper weights and larger corrected-level offset.
      sigma: width of the Gaussian kernel over the levels.
      eps: guards the adaptive temperature's denominator.

    Returns:
      The soft-rounded scores, same shape as ``s``; numerically ``round(s)``.
    """
    s = jnp.asarray(s, jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    nearest = (s > 0.5).astype(s.dtype)
    k_far = jnp.exp(-1.0 / (2.0 * jnp.square(jnp.asarray(sigma, jnp.float32))))
    # Logits of level 0 and level 1; the kernel down-weights whichever is not nearest.
    # phi = 1 - |s - q| written without the abs: no kink at s = 0 or 1, and outside [0, 1]
    # the nearest level still gets the larger logit.
    g0 = (1.0 - s) * jnp.where(nearest > 0, k_far, 1.0)
    g1 = s * jnp.where(nearest > 0, 1.0, k_far)
    beta = jax.lax.stop_gradient(t / (jnp.abs(g1 - g0) + eps))
    w1 = jax.nn.sigmoid(beta * (g1 - g0))  # = softmax(beta * (g0, g1))[1]
    lo, hi = corrected_levels(t)
    return (1.0 - w1) * lo + w1 * hi


def binarize(
    scores: jax.Array, temperature: float | jax.Array, sigma: float | jax.Array
) -> jax.Array:
    """Exact 0/1 gates with DAQ gradients: ``round(s) + daq(s) - stop_gradient(daq(s))``.

    The forward value is ``round(s)`` bit for bit (``x - x == 0`` in floating point); the
    backward pass is that of `daq_soft`.
    """
    soft = daq_soft(scores, temperature, sigma)
    hard = (jnp.asarray(scores, jnp.float32) > 0.5).astype(jnp.float32)
    return hard + (soft - jax.lax.stop_gradient(soft))


@flax.struct.dataclass
class Settings:
    """DAQ's ``T`` and kernel width ``sigma`` as pytree leaves (new values never recompile)."""

    temperature: jax.Array
    sigma: jax.Array

    @classmethod
    def create(cls, temperature: float, sigma: float) -> Settings:
        return cls(jnp.float32(temperature), jnp.float32(sigma))

    def binarize(self, scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """`binarize` of every site of ``site -> f32[B, C]`` scores: the gates (order kept)."""
        return {site: binarize(s, self.temperature, self.sigma) for site, s in scores.items()}

    def soft(self, scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """`daq_soft` of every site (order kept): numerically the gates, with DAQ's gradient."""
        return {site: daq_soft(s, self.temperature, self.sigma) for site, s in scores.items()}


# `top_fraction`'s gradient width, in units of a row's score std (the ranked loss terms and the
# fixed-density optima of `eval.oracle`).
TOP_FRACTION_WIDTH = 0.3


def top_fraction(
    scores_BxN: jax.Array, density_B: jax.Array, rel_temperature: float | jax.Array
) -> jax.Array:
    """The top ``round(density_b * N)`` scores of row b as gates (the ranked loss terms and the
    fixed-density searches of `eval.oracle`).

    Forward: exactly ``k_b = round(density_b * N)`` gates open per row, the k_b highest scores
    (the evaluation's top-k, `eval.baselines.top_k_at_density`; tied scores at the cut are
    taken in column order here, where the evaluation draws them at random). Backward: the
    straight-through gradient of ``sigmoid((s - t_b) / (rel_temperature * std_b))``, ``t_b`` the
    midpoint between the k-th and (k+1)-th score of row b and ``std_b`` the row's spread
    (stop-gradient), so the scores near each row's cut learn which side they belong on. The
    cut moves with the scores, as a rank does: shifting a whole row changes neither the mask
    nor the loss, so the gradient sums to zero over each row and reorders the scores without
    raising (or lowering) them.
    """
    n = scores_BxN.shape[-1]
    k_B = jnp.clip(jnp.round(density_B * n).astype(jnp.int32), 1, n - 1)
    order_BxN = jnp.argsort(-scores_BxN, axis=-1, stable=True)
    desc_BxN = jnp.take_along_axis(scores_BxN, order_BxN, -1)
    above_B = jnp.take_along_axis(desc_BxN, (k_B - 1)[:, None], -1)[:, 0]
    below_B = jnp.take_along_axis(desc_BxN, k_B[:, None], -1)[:, 0]
    cut_B = 0.5 * (above_B + below_B)
    width_B = rel_temperature * jnp.std(jax.lax.stop_gradient(scores_BxN), axis=-1) + 1e-6
    soft_BxN = jax.nn.sigmoid((scores_BxN - cut_B[:, None]) / width_B[:, None])
    ranks_BxN = jnp.argsort(order_BxN, axis=-1)
    hard_BxN = (ranks_BxN < k_B[:, None]).astype(scores_BxN.dtype)
    return hard_BxN + (soft_BxN - jax.lax.stop_gradient(soft_BxN))  # exactly 0/1 forward
