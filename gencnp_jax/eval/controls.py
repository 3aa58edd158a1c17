"""Input-independent controls: what a method scores if it were one fixed mask (or one per class).

``constant``: one mask for every input, the top channels of a training-set mean score.
``class_constant``: one mask per predicted class, the top channels of the class's mean score.
A method beats ``class_constant`` only if it uses something about the instance beyond its class:
``specificity_gain = mDC(class_constant) / mDC(method)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.eval import baselines


def class_mean_scores(
    scores_BxN: np.ndarray, classes_B: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_N, mean_KxN)``: the mean score over all rows, and over the rows of each class.

    ``mean_KxN[k] = sum_{i: c_i = k} s_i / |{i: c_i = k}|``; a class without rows takes
    ``mean_N`` (its mask is then the constant one).
    """
    scores_BxN = np.asarray(scores_BxN, np.float64)
    onehot_BxK = np.eye(num_classes)[np.asarray(classes_B)]
    counts_K = onehot_BxK.sum(0)
    mean_N = scores_BxN.mean(0)
    sums_KxN = onehot_BxK.T @ scores_BxN
    mean_KxN = np.where(counts_K[:, None] > 0, sums_KxN / np.maximum(counts_K, 1)[:, None], mean_N)
    return mean_N.astype(np.float32), mean_KxN.astype(np.float32)


def class_masks(mean_KxN: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """``f32[K, N]``: per class the top ``round(density * N)`` channels of its mean score
    (`baselines.top_k`: one global threshold over sites, ties broken at random by `key`)."""
    mean_KxN = jnp.asarray(mean_KxN)
    return baselines.top_k_at_density(mean_KxN, density, key, jnp.arange(mean_KxN.shape[0]))


def constant_mask(mean_N: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """``f32[N]``: the top ``round(density * N)`` channels of `mean_N` (one mask for all)."""
    return class_masks(jnp.asarray(mean_N)[None], density, key)[0]


def specificity_gain(mdc_class_constant: float, mdc_method: float) -> float:
    """``mDC(class_constant) / mDC(method)``: > 1 only where the method does better than the
    best one-mask-per-class control at the same density (NaN if ``mDC(method) = 0``)."""
    return float(mdc_class_constant / mdc_method) if mdc_method > 0 else float("nan")


def better_source(mdc_by_source: dict[str, float]) -> str:
    """The source whose control has the lower mDC (the first on ties; NaN counts as worst)."""
    finite = {k: v for k, v in mdc_by_source.items() if np.isfinite(v)}
    return min(finite, key=finite.get) if finite else next(iter(mdc_by_source))
