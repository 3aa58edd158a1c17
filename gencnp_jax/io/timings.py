"""Where a run's seconds go: named, nested phases, written to ``WORKDIR/timings.json``.

    with timings.phase("evaluate"):
        with timings.phase("score/cdrp"):
            ...

Phases nest by name (``evaluate/score/cdrp``); a phase entered again adds to its seconds.
Wall-clock seconds on the host: a phase that returns host arrays has waited for its device
work. `write` merges the seconds recorded by this process into the workdir's file (each stage
replaces its own entries, so a run resumed stage by stage keeps the others').
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from gencnp_jax.io import writers

FILE = "timings.json"
_STACK: list[str] = []
_SECONDS: dict[str, float] = {}


@contextlib.contextmanager
def phase(name: str):
    """Records the seconds of the block under ``<enclosing phases>/name``."""
    _STACK.append(name)
    path = "/".join(_STACK)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _SECONDS[path] = _SECONDS.get(path, 0.0) + time.perf_counter() - t0
        _STACK.pop()


def recorded(prefix: str = "") -> dict[str, float]:
    """The seconds recorded so far under `prefix` (all by default), by phase path."""
    if not prefix:
        return dict(_SECONDS)
    return {k: v for k, v in _SECONDS.items() if k == prefix or k.startswith(prefix + "/")}


def reset() -> None:
    _SECONDS.clear()


def write(workdir: str, stage: str) -> dict:
    """Merges the phases recorded under `stage` into ``WORKDIR/timings.json`` (process 0);
    returns the file's content: ``{stage: {"seconds": s, "phases": {path: s}}}``."""
    path = os.path.join(workdir, FILE)
    saved = writers.read_json(path) or {}
    mine = {k: round(v, 2) for k, v in recorded(stage).items()}
    saved[stage] = {"seconds": mine.get(stage), "phases": mine}
    if jax.process_index() == 0:
        writers.write_json(path, json.loads(json.dumps(saved)))
    return saved
