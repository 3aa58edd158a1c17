"""Stage dispatch for launch.py: one function per mode, `all` skips finished stages.

User-facing failures (bad config, missing data, stages out of order, a workdir locked by a
live run, a full disk) end with one clear message and exit status 1 instead of a traceback
from deep inside JAX. Training stages stop cleanly on SIGTERM / SIGINT (`io/preemption.py`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import time

import jax
import numpy as np

from gencnp_jax.context import inputs, record, user_model
from gencnp_jax.io import checkpointing, data, preemption, timings, weights, writers
from gencnp_jax.io import lock as lock_lib
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.stages import build_bank, modes, validation

_CLUSTER_ENV = (
    "SLURM_NTASKS",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_ADDRESS",
    "OMPI_COMM_WORLD_SIZE",
)


class UserError(Exception):
    """A problem the user can fix; its message says how."""


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Calls `jax.distributed.initialize` before any JAX work when this is a multi-host run."""
    explicit = coordinator is not None or num_processes is not None
    from_env = any(k in os.environ for k in _CLUSTER_ENV)
    if not (explicit or from_env):
        return
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise SystemExit(
            "multi-host: give all of --coordinator_address, --num_processes, "
            "--process_id (or none, to read them from the cluster environment)"
        )
    if jax.config.jax_platforms in (None, "", "cpu") and explicit:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


def check_workdir(workdir: str) -> str:
    """The absolute `workdir`, checked writable without creating anything: an existing
    folder is probed with a temporary file, a missing one through its nearest existing
    parent (created only once the run starts: a refused run leaves nothing behind)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    where = workdir
    while not os.path.exists(where):
        where = os.path.dirname(where)
    try:
        if not os.path.isdir(where):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), where)
        probe = os.path.join(where, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(
            f"workdir {workdir} is not writable ({err.strerror}): choose another "
            f"--workdir or fix its permissions"
        ) from err
    return workdir


def run_all(config, workdir: str) -> dict:
    """Runs every stage in order, skipping those already complete; returns timings.

    A stage whose outputs exist but one of them is cut short or does not parse runs again,
    after a warning naming the file; once a stage has run, every later stage runs again too
    (their outputs were made from what it replaced).
    """
    timings, ran = {}, False
    for mode in modes.PIPELINE:
        done, problem = workdir_lib.check_done(mode, workdir)
        if done and ran:
            print(f"[{mode}] an earlier stage ran again: running {mode} again", flush=True)
        elif done:
            print(f"[{mode}] already complete in {workdir}: skipped", flush=True)
            timings[mode] = "skipped"
            continue
        if problem is not None:
            print(f"warning: [{mode}] {problem}: running {mode} again", file=sys.stderr, flush=True)
        print(f"[{mode}] starting", flush=True)
        t0, ran = time.time(), True
        run_stage(mode, config, workdir, modes.ALL)
        timings[mode] = round(time.time() - t0, 1)
        print(f"[{mode}] done in {timings[mode]} s", flush=True)
    report = workdir_lib.done_file("report", workdir)
    print("\nSummary:", ", ".join(f"{k}: {v}" for k, v in timings.items()))
    print(f"Report: {report}", flush=True)
    return timings


TRAINING = ("train_classifier", "train_generator")


def run_stage(mode: str, config, workdir: str, launched_mode: str | None = None):
    """Runs one stage; a training stage under a SIGTERM / SIGINT guard (`io/preemption.py`).

    Records the run's config first (`record_config`), and the seconds of the stage and of
    the phases inside it in ``WORKDIR/timings.json`` (`io/timings.py`) once it is done.
    """
    if jax.process_index() == 0 and hasattr(config, "to_json_best_effort"):  # a ConfigDict
        record_config(mode, config, workdir)
    guard = contextlib.nullcontext()
    if mode in TRAINING:
        command = preemption.rerun_command(
            f"python launch.py --config=<this run's config> --workdir={workdir} "
            f"--mode={launched_mode or mode}"
        )
        guard = preemption.StopGuard(preemption.GRACE_S, command)
    with guard, timings.phase(mode):
        result = modes.stage_fn(mode)(config, workdir)
    timings.write(workdir, mode)
    return result


def record_config(mode: str, config, workdir: str):
    """Writes ``WORKDIR/config.json``, the record `Explainer.from_workdir(workdir)` reads back.

    A training stage writes it (its config is what made the models); any other stage only
    writes a missing (or unreadable) one, so an evaluation with other settings (``--mode=headroom
    --config.headroom.steps=0``) does not rewrite the trained run's record; it names the
    settings in which it differs instead.
    """
    path = os.path.join(workdir, record.CONFIG_FILE)
    text = config.to_json_best_effort(indent=2)
    recorded = _read_record(path)
    if mode in TRAINING or recorded is None:
        os.makedirs(workdir, exist_ok=True)
        writers.write_text(path, text)
        return
    running = weights.flatten(json.loads(text))
    changed = sorted(
        {
            k.rstrip("/0123456789").replace("/", ".")  # a list's entries name the list
            for k in recorded.keys() | running.keys()
            if recorded.get(k) != running.get(k)
        }
    )
    if changed:
        print(
            f"note: [{mode}] keeps the trained run's record {path}; this run differs from it "
            f"in {', '.join(changed)}",
            file=sys.stderr,
            flush=True,
        )


def _read_record(path: str) -> dict | None:
    """The flattened config record at `path`; None if it is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, not JSON
        return None
    return weights.flatten(tree) if isinstance(tree, dict) else None


@contextlib.contextmanager
def workdir_lock(workdir: str, mode: str):
    """Holds the workdir's lock (process 0 takes it; every process learns whether it got it).

    Raises:
      UserError: a live process holds it (the message names its pid, host and start).
    """
    lock = lock_lib.WorkdirLock(workdir, f"--mode={mode}")
    busy = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except lock_lib.WorkdirBusy as err:
            busy = str(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        got = multihost_utils.broadcast_one_to_all(np.int32(busy is None))
        if not int(got) and busy is None:
            busy = f"workdir {workdir} is in use by another run (see process 0's message)"
    if busy is not None:
        raise UserError(busy)
    try:
        yield lock
    finally:
        lock.release()


# Failures the user can fix: `run` prints their message on one line and exits with status 1.
USER_ERRORS = (
    UserError,
    validation.ConfigError,
    workdir_lib.StageOrderError,
    checkpointing.CheckpointError,
    data.DatasetError,
    FloatingPointError,
    build_bank.BankMismatchError,
    user_model.UserModelError,
    weights.WeightsError,
)


def require_classifier(workdir: str, mode: str) -> None:
    """Every mode but ``all`` and ``train_classifier`` reads the run's trained classifier.

    Raises:
      workdir_lib.StageOrderError: `mode` needs one and `workdir` holds none.
    """
    if mode in (modes.ALL, "train_classifier") or workdir_lib.is_done("train_classifier", workdir):
        return
    raise workdir_lib.StageOrderError(
        f"no trained classifier in {workdir_lib.classifier_dir(workdir)}: run `python "
        f"launch.py --config=... --workdir={workdir} --mode=train_classifier` first"
    )


def check_inputs(config, mode: str) -> None:
    """What `mode` reads that the config check does not cover: the images of
    ``--mode=explain`` (checked before anything is written).

    Raises:
      validation.ConfigError: the message says what to fix.
    """
    if mode == "explain":
        from gencnp_jax.stages import explain_images

        explain_images.load_images(config)


# Modes that read the fields `validation.small_data` checks against the data's size.
SIZED = (modes.ALL, "train_classifier", "train_generator", "evaluate", "headroom")


def run_pipeline(config, workdir: str, mode: str = modes.ALL):
    """Runs `mode` (default: every stage, skipping those already complete) as the command
    line does: the config checked, the workdir checked and created, its lock held.

    Returns:
      `run_all`'s timings for ``all``, else the stage's own result.

    Raises:
      One of `USER_ERRORS`, with a message that says what to change; nothing is written
      before the config, the workdir and the mode's inputs (`check_inputs`) have passed
      their checks: a refused run leaves the filesystem as it was.
    """
    logging.getLogger("absl").setLevel(logging.WARNING)
    if mode not in modes.NAMES:
        raise UserError(f"unknown mode {mode!r}: choose one of {modes.NAMES}")
    workdir = check_workdir(workdir)
    validation.check_config(config)
    check_inputs(config, mode)
    if mode in SIZED:
        note = validation.small_data(config, inputs.split_sizes(config))
        if note and jax.process_index() == 0:
            print(f"note: {note}", file=sys.stderr, flush=True)
    if not os.path.exists(workdir):  # else under the lock: a live run may be training it
        require_classifier(workdir, mode)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir, mode):
        require_classifier(workdir, mode)
        if mode == modes.ALL:
            return run_all(config, workdir)
        return run_stage(mode, config, workdir)


def run(mode: str, config, workdir: str):
    """The command line's `run_pipeline`: user-fixable errors exit with one message (status
    1), a SIGTERM / SIGINT of a training stage with one message saying how to resume (status
    128 + signal)."""
    try:
        return run_pipeline(config, workdir, mode)
    except USER_ERRORS as err:
        _fail(f"error: {err}", 1)
    except preemption.Preempted as err:
        _fail(f"error: {err}", err.exit_code)
    except OSError as err:
        if not checkpointing.is_no_space(err):
            raise
        where = err.filename or workdir
        free = shutil.disk_usage(workdir).free / 2**20
        _fail(
            f"error: no space left on device writing {where} ({free:.1f} MiB free there): "
            f"free some space or use another --workdir, then rerun",
            1,
        )


def _fail(message: str, code: int):
    _close_progress_bars()  # else the message lands at the end of a half-drawn bar
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
