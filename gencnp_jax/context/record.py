"""The config a run records in its workdir (``WORKDIR/config.json``), read back.

A recorded config is merged once over today's defaults (`configs/default.py`, the one source
of every default): fields added since the run take their default (or, where the default
changed what a run builds, `ADDED`'s value: what runs did before the field existed), fields
renamed since take the recorded value under their new name, and fields retired since are
dropped with a note.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections

CONFIG_FILE = "config.json"  # written into the workdir by the pipeline's training stages

# Fields renamed since they were first recorded: old dotted name -> new dotted name.
MOVED = {
    "classifier.batch_size": "train.batch_size",
    "classifier.eval_batch_size": "train.eval_batch_size",
    "classifier.checkpoint_every": "train.checkpoint_every",
    "classifier.log_every": "train.log_every",
    "classifier.grad_clip": "train.grad_clip",
    "generator.opt.learning_rate": "generator.learning_rate",
    "generator.opt.warmup_steps": "generator.warmup_steps",
}
# Fields added since runs were first recorded whose default changes the model a run built:
# dotted name -> the value that reproduces runs recorded before the field existed.
ADDED = {
    "generator.model.grad_evidence": False,
    "generator.loss.w_rank": 0.0,
}
# Values taken whole (a user's keyword arguments), never merged field by field.
OPAQUE = ("classifier.factory_kwargs",)


def _tuples(tree):
    """JSON lists back to the tuples a config holds (e.g. ``generator.model.pooling``)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in OPAQUE:
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def merged_over_defaults(recorded: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """``(config, dropped)``: `recorded` (a config as a nested dict) over today's defaults,
    and the recorded fields that no longer exist."""
    from configs import default  # the one source of every default

    config = default.get_config()
    dropped = []
    flat = _flat(_tuples(recorded))
    for name, value in ADDED.items():
        if name not in flat:
            flat[name] = value
    for name, value in flat.items():
        name = MOVED.get(name, name)
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            dropped.append(name)
            continue
        if name in OPAQUE:
            value = ml_collections.ConfigDict(value)
        elif isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)
        node[leaf] = value
    return config, dropped


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as ``WORKDIR/config.json`` (the pipeline writes it), merged over
    today's defaults (`merged_over_defaults`; a note names any dropped field).

    Raises:
      FileNotFoundError: the workdir holds no config.json.
      ValueError: it does not parse as a JSON object.
    """
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no config given and no {path}: pass the run's config, "
            f"Explainer.from_workdir(workdir, config), or a workdir that launch.py has run in"
        )
    try:
        with open(path, encoding="utf-8") as f:
            tree = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} does not parse ({err}): pass the run's config instead") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path} is not a JSON object: pass the run's config instead")
    config, dropped = merged_over_defaults(tree)
    if dropped:
        print(
            f"note: {path} records fields that no longer exist, left out: {', '.join(dropped)}",
            file=sys.stderr,
        )
    return config
