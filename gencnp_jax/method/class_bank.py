"""Class pathways (docs/METHOD.md §5) as pure functions: aggregate the pathways of `j` samples
per class into `F_c` and a class pathway, and transfer a class pathway to new inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.models import gates as gates_lib

CLASS_SOURCES = ("prediction", "label")


@flax.struct.dataclass
class ClassBank:
    """Class pathways of a classifier with ``K`` classes.

    Attributes:
      freq: ``site -> f32[K, C]``: ``F_c[site, k]``, the fraction of class-c samples whose
        pathway keeps neuron k.
      masks: ``site -> f32[K, C]``: the class pathways ``1[F_c >= threshold]`` (exactly 0/1).
      counts: ``i32[K]``: samples aggregated per class (at most `samples_per_class`). A class
        with no sample has ``F_c = 0`` and an empty (all-closed) pathway: no evidence was seen
        for it, and an all-open pathway would pass for a perfect explanation.
      samples_per_class: ``j``, the samples asked for per class.
      threshold: ``rho``.
      class_source: how samples were assigned to classes: "prediction" or "label".
      fingerprint: hash of the classifier the bank was built for
        (`gencnp_jax.stages.build_bank.fingerprint`).
      score_mean: ``site -> f32[K, C]``: the class's mean generator score per neuron over the
        same samples (`ranking` breaks ties of ``F_c`` with it); None in older banks.
    """

    freq: dict[str, jax.Array]
    masks: dict[str, jax.Array]
    counts: jax.Array
    samples_per_class: int = flax.struct.field(pytree_node=False, default=0)
    threshold: float = flax.struct.field(pytree_node=False, default=0.5)
    class_source: str = flax.struct.field(pytree_node=False, default="prediction")
    fingerprint: str = flax.struct.field(pytree_node=False, default="")
    score_mean: dict[str, jax.Array] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def site_channels(self) -> dict[str, int]:
        return {s: int(f.shape[-1]) for s, f in self.freq.items()}

    def ranking(self) -> np.ndarray:
        """``f32[K, N]`` (sites flattened in order): how each class pathway ranks its neurons
        at a fixed density: by ``F_c``, ties broken by the class's mean score.

        ``F_c`` alone ties whole blocks (every neuron all j samples keep has ``F_c = 1``), and
        a top-d taken inside a tie is a random pick. The tie-break adds less than half the
        smallest step of ``F_c`` (``1 / count``), so it never reorders different ``F_c``.
        A bank without `score_mean` ranks by ``F_c`` alone.
        """
        freq_KxN = np.asarray(gates_lib.flatten(self.freq), np.float64)
        if self.score_mean is None:
            return freq_KxN.astype(np.float32)
        score_KxN = np.asarray(gates_lib.flatten(self.score_mean))
        # equal scores share a rank (the evaluation breaks remaining ties at random, §6)
        rank_KxN = np.stack([np.searchsorted(np.sort(row), row) for row in score_KxN])
        step = 1.0 / max(int(np.max(np.asarray(self.counts))), 1)
        return (freq_KxN + 0.5 * step * rank_KxN / score_KxN.shape[-1]).astype(np.float32)

    def class_density(self) -> np.ndarray:
        """Kept neurons / all neurons of each class pathway: ``f64[K]``."""
        return np.asarray(gates_lib.density(self.masks), np.float64)


def aggregate(
    gates: Mapping[str, jax.Array],
    classes_B: jax.Array,
    num_classes: int,
    threshold: float,
    valid_B: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """``(freq, masks, counts)``: per-class mean of binary gates and ``freq >= threshold``.

    A class with no (valid) sample gets ``freq = 0`` and so an empty pathway.
    """
    freq, counts_K = class_means(gates, classes_B, num_classes, valid_B)
    return freq, pathways(freq, counts_K, threshold), counts_K.astype(jnp.int32)


def pathways(
    freq: Mapping[str, jax.Array], counts_K: jax.Array, threshold: float
) -> dict[str, jax.Array]:
    """The class pathways ``1[F_c >= threshold]``, ``site -> f32[K, C]``; empty for a class
    without samples."""
    return {
        s: ((f >= threshold) & (counts_K[:, None] > 0)).astype(jnp.float32) for s, f in freq.items()
    }


def class_means(
    values: Mapping[str, jax.Array],
    classes_B: jax.Array,
    num_classes: int,
    valid_B: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """``(means, counts)``: ``site -> f32[K, C]`` mean of each class's (valid) rows of
    ``site -> f32[B, C]`` (0 for a class without rows), and ``f32[K]`` rows per class."""
    w_B = jnp.ones(classes_B.shape, jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
    onehot_BxK = jax.nn.one_hot(classes_B, num_classes) * w_B[:, None]
    counts_K = onehot_BxK.sum(0)
    means = {s: (onehot_BxK.T @ v) / jnp.maximum(counts_K, 1.0)[:, None] for s, v in values.items()}
    return means, counts_K


def transfer(bank: ClassBank, classes_B: jax.Array) -> gates_lib.Gates:
    """Class pathway of each sample's class: ``site -> f32[B, C]`` (no generator call; jit-able)."""
    return {s: m[classes_B] for s, m in bank.masks.items()}


def first_per_class(classes_N: np.ndarray, num_classes: int, j: int) -> np.ndarray:
    """Indices of the first `j` samples of each class in dataset order, class by class."""
    return np.concatenate([np.flatnonzero(classes_N == c)[:j] for c in range(num_classes)])
