"""One writer per workdir: a lock file holding the live process's id, host and start time.

`WorkdirLock(workdir).acquire()` creates `WORKDIR/.lock` exclusively (`O_EXCL`). When it
exists, the holder is alive (same host: its pid runs and started when the file says; another
host: assumed alive) and `WorkdirBusy` names it; a lock left by a dead process of this host is
taken over with a warning. `release()` removes the file only while it still names us.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (always assumed on another host)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False  # ours, left by an earlier stage of this process that did not release
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    ticks = holder.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)  # else: a reused pid


class WorkdirLock:
    """The lock on one workdir (see the module docstring); a context manager."""

    def __init__(self, workdir: str, what: str = ""):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.what = what
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "what": what,
        }
        self.held = False

    def holder(self) -> dict | None:
        """The lock file's contents; {} when it exists but cannot be read; None if absent."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> WorkdirLock:
        """Takes the lock. Raises `WorkdirBusy` (naming the holder) when a live process has it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                if holder and _alive(holder):
                    raise WorkdirBusy(self.busy_message(holder)) from None
                if not holder and time.time() - _mtime(self.path) < 5.0:
                    time.sleep(0.2)  # being written right now by its creator
                    continue
                log.warning(
                    "taking over the stale lock %s of process %s on %s (since %s): it is gone",
                    self.path,
                    holder.get("pid", "?"),
                    holder.get("host", "?"),
                    holder.get("since", "?"),
                )
                _remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return self
        raise WorkdirBusy(f"could not take the lock {self.path}: another process keeps taking it")

    def busy_message(self, holder: dict) -> str:
        what = f" ({holder['what']})" if holder.get("what") else ""
        return (
            f"workdir {os.path.dirname(self.path)} is in use by process {holder.get('pid', '?')} "
            f"on host {holder.get('host', '?')} since {holder.get('since', '?')}{what}: wait for "
            f"it to end, or use another --workdir (if that process is gone, delete {self.path})"
        )

    def release(self) -> None:
        if self.held and (self.holder() or {}).get("pid") == self.me["pid"]:
            _remove(self.path)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
