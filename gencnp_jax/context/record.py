"""The config a run records in its workdir (``WORKDIR/config.json``), read back."""

from __future__ import annotations

import json
import os

import ml_collections

CONFIG_FILE = "config.json"  # written into the workdir by the pipeline's training stages


def _tuples(tree):
    """JSON lists back to the tuples a config holds (e.g. ``generator.model.pooling``)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as ``WORKDIR/config.json`` (the pipeline writes it).

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
    return ml_collections.ConfigDict(_tuples(tree))
