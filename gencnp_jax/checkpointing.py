"""Orbax checkpoints for every trained thing (classifier, generator, bank).

One `Checkpointer` per directory: a pytree `state` plus a JSON `meta`; restores
fall back past damaged steps with a warning, and say what to delete if none is good.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def _replicated_abstract(leaf) -> jax.ShapeDtypeStruct:
    """Restore target: the leaf's shape and dtype, replicated over every device.

    Never the sharding the checkpoint was saved with: a run saved on 2 devices must
    restore on 1 (or on 8, or across hosts).
    """
    shape_dtype = ocp.utils.to_shape_dtype_struct(leaf)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype, sharding=replicated)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with damaged-step fallback."""

    def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Saves `state` at `step` (every process must call this) and waits for it.

        A step that is already saved is kept as it is (a resumed run re-reaching it).
        """
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """Restores `(step, state, meta)` shaped like `template`; None if there is no checkpoint.

        Without `step`, tries the newest step first and falls back to older ones when a
        step cannot be read (a warning names the damaged step).
        """
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            return None
        abstract = jax.tree.map(_replicated_abstract, template)
        damaged = []
        for s in steps:
            try:
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                return s, restored.state, dict(restored.meta or {})
            except Exception as err:  # any read failure means this step is unusable
                log.warning(
                    "checkpoint step %d in %s is damaged (%s: %s); trying an older one",
                    s,
                    self.directory,
                    type(err).__name__,
                    str(err)[:300],
                )
                damaged.append(s)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: steps {damaged} are damaged. "
            f"Delete that directory to start this stage over."
        )

    def close(self) -> None:
        self._manager.close()
