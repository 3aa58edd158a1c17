"""Stage dispatch for launch.py: one function per mode, `all` skips finished stages.

User-facing failures (bad config, missing data, stages out of order) end with one
clear message and exit status 1 instead of a traceback from deep inside JAX.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jax

from gencnp_jax.io import checkpointing, data
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.stages import build_bank, context, modes, validation

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
    """Creates `workdir` if needed and checks that it is writable."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
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
    """Runs every stage in order, skipping those already complete; returns timings."""
    timings = {}
    for mode in modes.PIPELINE:
        if workdir_lib.is_done(mode, workdir):
            print(f"[{mode}] already complete in {workdir}: skipped", flush=True)
            timings[mode] = "skipped"
            continue
        print(f"[{mode}] starting", flush=True)
        t0 = time.time()
        modes.stage_fn(mode)(config, workdir)
        timings[mode] = round(time.time() - t0, 1)
        print(f"[{mode}] done in {timings[mode]} s", flush=True)
    report = workdir_lib.done_file("report", workdir)
    print("\nSummary:", ", ".join(f"{k}: {v}" for k, v in timings.items()))
    print(f"Report: {report}", flush=True)
    return timings


# Failures the user can fix: `run` prints their message on one line and exits with status 1.
USER_ERRORS = (
    UserError,
    validation.ConfigError,
    context.StageOrderError,
    checkpointing.CheckpointError,
    data.DatasetError,
    FloatingPointError,
    build_bank.BankMismatchError,
)


def run(mode: str, config, workdir: str):
    """Runs one mode; user-fixable errors exit with one message (status 1)."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        workdir = check_workdir(workdir)
        validation.check_config(config)
        if jax.process_index() == 0:
            logging_utils.write_text(
                os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
            )
        if mode not in modes.NAMES:
            raise UserError(f"unknown mode {mode!r}: choose one of {modes.NAMES}")
        if mode == modes.ALL:
            return run_all(config, workdir)
        return modes.stage_fn(mode)(config, workdir)
    except USER_ERRORS as err:
        _close_progress_bars()  # else the message lands at the end of a half-drawn bar
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
