"""Device mesh and batch placement: data parallel over a `data` axis, params replicated.

The same code runs on one CPU device, N accelerators, or many hosts after
`jax.distributed.initialize()`: every process computes the same global batch
indices and contributes its own slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all devices of all hosts by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(mesh: Mesh, tree):
    """Places every leaf of `tree` on every device of the mesh.

    On several processes every process holds the same values; an array already committed to
    a local device would need a cross-host transfer (which CPU and GPU backends lack), so such
    leaves are placed from host copies instead.
    """
    if jax.process_count() > 1:
        tree = jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
            tree,
        )
    return jax.device_put(tree, replicated(mesh))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"batch size {batch_size} does not split over {mesh.size} devices: choose a multiple"
        )


def shard_batch(mesh: Mesh, *global_arrays: np.ndarray):
    """Splits host arrays holding the *global* batch along axis 0 over the mesh.

    Each process keeps only its own contiguous slice (all processes hold the same
    global batch, since batch indices depend only on seed and step).
    """
    n_proc, pid = jax.process_count(), jax.process_index()
    sharding = batch_sharded(mesh)
    out = []
    for arr in global_arrays:
        per_process = arr.shape[0] // n_proc
        local = arr[pid * per_process : (pid + 1) * per_process]
        out.append(jax.make_array_from_process_local_data(sharding, local, arr.shape))
    return tuple(out) if len(out) > 1 else out[0]


def to_host(tree):
    """Fetches a (possibly multi-host) replicated or sharded pytree as numpy arrays."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def process_0_first(fn, name: str):
    """Runs `fn()` on process 0, then, after a barrier, on every other process.

    For work that writes shared files, such as preparing a TFDS dataset in a shared data dir:
    run concurrently, two processes race to rename the same folder. If process 0 fails, it
    still reaches the barrier before raising, so the others run `fn` (and fail the same way)
    instead of waiting forever.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised after the barrier
            error = err
    multihost_utils.sync_global_devices(f"process_0_first:{name}")
    if error is not None:
        raise error
    return result if jax.process_index() == 0 else fn()
