"""The one loop over a split: pad to fixed batches, shard over the mesh, run, gather, trim.

Every stage that maps a jitted function over many examples (predictions, pathways, metrics)
goes through `map_batches`, so each program compiles once and padded rows never leak out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from gencnp_jax.io import data, sharding


def map_batches(
    fn: Callable[..., object],
    make_batch: Callable[[np.ndarray], object],
    num_examples: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    progress: Callable[[int], object] | None = None,
    stop: Callable[[object], bool] | None = None,
) -> object:
    """Runs ``fn(batch)`` over ``num_examples`` rows and returns its outputs for every row.

    Args:
      fn: maps a sharded batch pytree to an output pytree whose leaves have the batch on axis 0
        (typically a jitted function with its other arguments bound).
      make_batch: ``indices int64[batch_size] -> host pytree`` of the rows to feed; padded
        batches repeat the last index, so every call has the same shape (one compilation).
      num_examples: rows to cover, ``0..num_examples-1``.
      batch_size: rows per call; a multiple of the mesh size.
      mesh: the device mesh; batches are split over its ``data`` axis.
      progress: called with the number of valid rows after each batch (e.g. ``bar.update``).
      stop: called with the outputs gathered so far (concatenated); True ends the loop early.

    Returns:
      The output pytree, leaves concatenated over batches and trimmed to the valid rows (host
      numpy). With `stop`, only the rows up to the batch that stopped.
    """
    chunks = []
    for idx, valid in data.eval_batches(num_examples, batch_size):
        batch = jax.tree.map(lambda a: sharding.shard_batch(mesh, np.asarray(a)), make_batch(idx))
        out = sharding.to_host(fn(batch))
        chunks.append(jax.tree.map(lambda v, n=valid: np.asarray(v)[:n], out))
        if progress is not None:
            progress(valid)
        if stop is not None and stop(_concat(chunks)):
            break
    return _concat(chunks)


def _concat(chunks: list) -> object:
    return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)
