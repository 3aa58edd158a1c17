"""Compares the results of two runs' workdirs: is every number the same?

    python scripts/compare_runs.py WORKDIR_A WORKDIR_B [--rtol=0] [--ignore=seconds,...]

Compares what a run reports: ``classifier/metrics.json``, ``generator/metrics.json``,
``bank/bank.json``, ``eval/results.json`` (every number, recursively) and the arrays of the
class-pathway bank checkpoint and of the final classifier and generator checkpoints (read
with orbax, no template). Timings, paths and settings that name the code (``seconds``,
``*_seconds``, ``*per_second``, ``imported_from``...) are left out. Prints one line per
difference and a summary; exits 1 when anything differs beyond ``--rtol`` / ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

JSON_FILES = (
    "classifier/metrics.json",
    "generator/metrics.json",
    "bank/bank.json",
    "eval/results.json",
)
CHECKPOINTS = ("bank/checkpoint", "classifier/final", "generator/final")
TIMING_KEYS = ("seconds", "seconds_per_image", "train_seconds", "train_steps_per_second")


def _skip(key: str, ignore: tuple[str, ...]) -> bool:
    return key in TIMING_KEYS or key.endswith(("_seconds", "per_second")) or key in ignore


def compare_json(a, b, path: str, out: list, tol: tuple[float, float], ignore) -> int:
    """Appends a line per difference under `path` to `out`; returns the numbers compared."""
    rtol, atol = tol
    if isinstance(a, dict) and isinstance(b, dict):
        n = 0
        for key in sorted(set(a) | set(b)):
            if _skip(key, ignore):
                continue
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'B' if key not in a else 'A'}")
                continue
            n += compare_json(a[key], b[key], f"{path}/{key}", out, tol, ignore)
        return n
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: lengths {len(a)} vs {len(b)}")
            return 0
        return sum(
            compare_json(x, y, f"{path}[{i}]", out, tol, ignore)
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        same = (a == b) or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + rtol * abs(b)
        if not same:
            out.append(f"{path}: {a!r} vs {b!r}")
        return 1
    if a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
    return 1


def _arrays(folder: str) -> dict[str, np.ndarray]:
    """The leaves of the newest orbax step in `folder`, by key path (no template needed: the
    checkpoint's own metadata gives every shape and dtype)."""
    import jax
    import orbax.checkpoint as ocp

    steps = sorted(int(s) for s in os.listdir(folder) if s.isdigit())
    state = os.path.join(folder, str(steps[-1]), "state")
    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata(state)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
    )
    flat = jax.tree_util.tree_flatten_with_path(ckpt.restore(state, abstract))[0]
    ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def compare_arrays(a: str, b: str, name: str, out: list, tol) -> int:
    left, right = _arrays(a), _arrays(b)
    if set(left) != set(right):
        out.append(f"{name}: leaves differ: {sorted(set(left) ^ set(right))[:6]}")
    n = 0
    for key in sorted(set(left) & set(right)):
        x, y = left[key], right[key]
        n += x.size
        if x.shape != y.shape:
            out.append(f"{name}{key}: shapes {x.shape} vs {y.shape}")
        elif not np.allclose(x, y, rtol=tol[0], atol=tol[1], equal_nan=True):
            diff = np.max(np.abs(x.astype(np.float64) - y))
            out.append(f"{name}{key}: max |difference| {diff:.3g}")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rtol", type=float, default=0.0)
    parser.add_argument("--atol", type=float, default=0.0)
    parser.add_argument("--ignore", default="", help="comma-separated keys to leave out")
    args = parser.parse_args(argv)
    tol, ignore = (args.rtol, args.atol), tuple(k for k in args.ignore.split(",") if k)
    out, counted = [], 0
    for name in JSON_FILES:
        pa, pb = os.path.join(args.a, name), os.path.join(args.b, name)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            out.append(f"{name}: missing in {'A' if not os.path.exists(pa) else 'B'}")
            continue
        with open(pa) as fa, open(pb) as fb:
            counted += compare_json(json.load(fa), json.load(fb), name, out, tol, ignore)
    for name in CHECKPOINTS:
        pa, pb = os.path.join(args.a, name), os.path.join(args.b, name)
        if os.path.isdir(pa) and os.path.isdir(pb):
            counted += compare_arrays(pa, pb, name, out, tol)
    for line in out:
        print(line)
    verdict = "identical" if not out else f"{len(out)} differences"
    print(f"{counted} numbers compared: {verdict} (rtol {tol[0]}, atol {tol[1]})")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
