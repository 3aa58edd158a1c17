"""Orbax checkpoints for every trained thing (classifier, generator, bank).

One `Checkpointer` per directory: a pytree `state` plus a JSON `meta`; restores
fall back past damaged steps with a warning, and say what to delete if none is good.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sys
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


# Key of the state's checksum in `meta`: orbax reads a bit-flipped array file without error.
CHECKSUM_KEY = "_state_sha256"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def tree_checksum(tree, *, by_path: bool = False, suffix: str = "") -> str:
    """sha256 over every leaf's dtype, shape and bytes (the package's one array hash).

    Args:
      tree: any pytree of arrays (PRNG keys are hashed through their key data).
      by_path: hash leaves sorted by their path and prefix each with that path, so renaming a
        parameter changes the hash; else leaves go in `jax.tree.leaves` order, unnamed.
      suffix: text hashed after the leaves (e.g. what else identifies the tree).

    Replicated leaves spread over several hosts are read from one local shard (all equal).
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if by_path:
        leaves = sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0]))
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            if not leaf.is_fully_addressable:
                leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        if by_path:
            header = f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};"
        else:
            header = f"{array.dtype}{array.shape};"
        digest.update(header.encode())
        digest.update(array.tobytes())
    digest.update(suffix.encode())
    return digest.hexdigest()


def _replicated_abstract(leaf) -> jax.ShapeDtypeStruct:
    """Restore target: the leaf's shape and dtype, replicated over every device.

    Never the sharding the checkpoint was saved with: a run saved on 2 devices must
    restore on 1 (or on 8, or across hosts).
    """
    shape_dtype = ocp.utils.to_shape_dtype_struct(leaf)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype, sharding=replicated)


def _is_read_echo(exc: BaseException | None, obj) -> bool:
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)  # an un-awaited orbax read coroutine
    return code is not None and "orbax" in code.co_filename


class _ReadEchoFilter(logging.Filter):
    """Drops asyncio's reports of orbax / TensorStore reads nobody awaited any more."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message:
            return True
        tb = record.exc_info[2] if record.exc_info else None
        files = " ".join(f.filename for f in traceback.extract_tb(tb)) if tb else ""
        return not any(w in message + files for w in ("orbax", "tensorstore", "OCDBT"))


_quiet = False


def _quiet_failed_reads() -> None:
    """Silences the echoes of a failed orbax read (once per process; idempotent).

    When one array of a step cannot be read, orbax stops and closes its event loop while
    TensorStore still completes the other reads; each completion reports "Event loop is
    closed", and un-awaited read tasks are reported when collected: hundreds of lines of
    tracebacks for one damaged step that our warning already names. Only those are dropped.
    """
    global _quiet
    if _quiet:
        return
    _quiet = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_read_echo(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_ReadEchoFilter())


def is_no_space(err: BaseException) -> bool:
    """Whether `err` (an OSError, or orbax / TensorStore's ValueError) means a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os_error_code='28'" in text


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _du(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


class _NoSpaceFilter(logging.Filter):
    """Drops orbax's tracebacks of a save that failed on a full disk: `save` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("raised an exception" in text and is_no_space(ValueError(text)))


_no_space_quiet = False


def _quiet_no_space() -> None:
    global _no_space_quiet
    if not _no_space_quiet:
        _no_space_quiet = True
        logging.getLogger("absl").addFilter(_NoSpaceFilter())


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with damaged-step fallback."""

    def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # what a save that was killed half-way leaves
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._damaged: set[int] = set()  # steps `restore` found unreadable: `save` replaces them

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Saves `state` at `step` (every process must call this) and waits for it.

        A step that is already saved is kept as it is (a resumed run re-reaching it), unless
        `restore` found it damaged: then it is replaced. `meta` also gets the state's checksum.
        """
        if step in self._manager.all_steps():
            if step not in self._damaged:
                return
            self._manager.delete(step)
            self._damaged.discard(step)
        meta = {**(meta or {}), CHECKSUM_KEY: tree_checksum(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        _quiet_no_space()
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as err:
            if not is_no_space(err):
                raise
            raise CheckpointError(self._no_space_message(step)) from None

    def _no_space_message(self, step: int) -> str:
        """Removes the half-written `step` (its space back) and says what is free and kept."""
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        kept = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        free = shutil.disk_usage(self.directory).free
        need = _du(os.path.join(self.directory, str(kept[-1]))) if kept else 0
        keeps = (
            f"the checkpoint of step {kept[-1]} is kept and a rerun resumes from it"
            if kept
            else "no earlier checkpoint exists"
        )
        return (
            f"no space left on device: checkpoint step {step} could not be saved in "
            f"{self.directory} ({_size(free)} free there; a checkpoint takes about "
            f"{_size(need)}); {keeps}: free some space or use another --workdir"
        )

    def restore(self, template, step: int | None = None):
        """Restores `(step, state, meta)` shaped like `template`; None if there is no checkpoint.

        Without `step`, tries the newest step first and falls back to older ones when a
        step cannot be read or its arrays do not match the checksum saved with them (a
        warning names the damaged step).

        Raises:
          CheckpointError: every step is damaged; the message says what to delete.
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
                meta = dict(restored.meta or {})
                saved_sum = meta.pop(CHECKSUM_KEY, None)  # absent in checkpoints of old runs
                if saved_sum is not None and saved_sum != tree_checksum(restored.state):
                    raise ValueError("its arrays do not match the checksum saved with them")
                return s, restored.state, meta
            except Exception as err:  # any read failure means this step is unusable
                _quiet_failed_reads()
                log.warning(
                    "checkpoint step %d in %s is damaged (%s: %s); trying an older one",
                    s,
                    self.directory,
                    type(err).__name__,
                    " ".join(str(err).split())[:300],  # one line
                )
                damaged.append(s)
                self._damaged.add(s)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: steps {damaged} are damaged or were "
            f"saved with another config (see the warnings above). Delete that directory to "
            f"start this stage over, or use another --workdir."
        )

    def close(self) -> None:
        self._manager.close()
