"""Metric sinks: JSON lines, TensorBoard event files, and a terminal progress bar.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm


class MetricWriter:
    """Writes flat dicts of scalars to `DIR/metrics.jsonl` and TensorBoard in `DIR/tb`."""

    def __init__(self, directory: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tb"))
            self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar on process 0 only (disabled elsewhere, or everywhere with `disable`)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        disable=disable or jax.process_index() != 0,
        mininterval=1.0,
    )


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **kwargs):
    """Opens a temporary file beside `path`; renamed onto `path` only when the block ends
    without error (else removed): readers see the old file or the whole new one, never half."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, payload: dict) -> None:
    """Atomically writes a JSON file (process 0 only), so a crash never leaves half a file."""
    if jax.process_index() != 0:
        return
    with atomic_file(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    """Atomically writes a text file (process 0 only)."""
    if jax.process_index() != 0:
        return
    with atomic_file(path) as f:
        f.write(text)
