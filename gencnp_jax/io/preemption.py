"""Stopping a training stage cleanly on SIGTERM / SIGINT (preemptible hosts).

`StopGuard(grace_s, command)` is a context manager that installs the handlers for the
duration of a training stage and restores the previous ones after. The training loop marks
the region where it polls the flag (`guard.polling()`) and asks `guard.should_stop(step)`
after each step: on several processes the flag is all-gathered every `sync_every` steps at
the same steps everywhere, so every process stops after the same step and saves the same
checkpoint. Outside that region a signal stops the stage at once (`Preempted` is raised by
the handler: nothing of the training state is lost, the last checkpoint is on disk).

A second signal, or a step that does not end within the grace period, ends the process at
once (`os._exit`) with one line saying which checkpoint a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_active: StopGuard | None = None


class Preempted(Exception):
    """A stage stopped by a signal; the message says where, and how to resume.

    Attributes:
      exit_code: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def active() -> StopGuard | None:
    """The guard installed now (None outside a training stage launched by the pipeline)."""
    return _active


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a stop request of another process"


GRACE_S = 30.0  # SIGTERM / SIGINT of a training stage: checkpoint and exit within 30 s


class StopGuard:
    """Signal handlers for one training stage (see the module docstring).

    Args:
      grace_s: seconds between the signal and the process's exit, at most.
      command: the command that resumes the run (quoted in every message).
    """

    def __init__(self, grace_s: float, command: str):
        self.grace_s = float(grace_s)
        self.command = command
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.resume_step: int | None = None  # the newest saved step (the loop keeps it)
        self.where = ""  # the checkpoint folder (the loop sets it)
        self._polling = False
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    # --- installation -------------------------------------------------------------------

    def __enter__(self) -> StopGuard:
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread: no guard
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
        if _active is self:
            _active = None

    @contextlib.contextmanager
    def polling(self):
        """The region where the training loop checks `should_stop` (signals only set a flag)."""
        self._polling = True
        try:
            yield self
        finally:
            self._polling = False
        if self.signum is not None:  # a signal during the loop's last step or final save
            raise self.preempted(self.resume_step)

    # --- the handler --------------------------------------------------------------------

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is not None:  # a second signal: stop now, without a new checkpoint
            self._exit_now(f"second {signal_name(signum)}: stopped at once", 128 + signum)
        self.signum = signum
        self.received_at = time.monotonic()
        deadline = max(self.grace_s - 3.0, self.grace_s * 0.5)
        self._timer = threading.Timer(deadline, self._timeout)
        self._timer.daemon = True
        self._timer.start()
        if not self._polling:
            raise self.preempted(self.resume_step)

    def _timeout(self) -> None:
        self._exit_now(
            f"{signal_name(self.signum)}: the current step did not end within the "
            f"{self.grace_s:g} s grace period",
            128 + (self.signum or signal.SIGTERM),
        )

    def _exit_now(self, why: str, code: int) -> None:
        resume = self._resume_text(self.resume_step)
        os.write(2, f"\nerror: {why}; {resume}; resume with: {self.command}\n".encode())
        os._exit(code)

    # --- what the loop asks --------------------------------------------------------------

    def should_stop(self, step: int, sync_every: int = 1) -> bool:
        """Whether every process stops after `step` (steps done so far); call on all processes.

        One process: the local flag, at every step. Several: the flags are all-gathered at
        the steps that are multiples of `sync_every` (the same steps on every process), and
        all stop when any got a signal.
        """
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        if step % max(1, sync_every):
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(local))
        return bool(np.any(flags))

    def preempted(self, step: int | None, saved_now: bool = False) -> Preempted:
        """The exception that ends the stage; `saved_now`: the loop just saved `step` for it."""
        name = signal_name(self.signum)
        if saved_now:
            text = f"stopped by {name} at step {step}, checkpoint saved in {self.where}"
        else:
            text = f"stopped by {name}; {self._resume_text(step)}"
        return Preempted(f"{text}; resume with: {self.command}", self.signum or signal.SIGTERM)

    def _resume_text(self, step: int | None) -> str:
        if step is None:
            return "a rerun resumes from this stage's last checkpoint, if it has one"
        return f"the last checkpoint is step {step} in {self.where}: a rerun resumes from it"


def rerun_command(fallback: str) -> str:
    """The command line of this process when it is launch.py, else `fallback`."""
    argv = sys.argv
    if argv and os.path.basename(argv[0]) == "launch.py":
        import shlex

        return shlex.join([sys.executable or "python", *argv])
    return fallback
