"""The one registry of launch modes: name -> the stage function it runs (imported on use).

`launch.py` offers exactly these names (plus `all`); `pipeline.run_all` runs `PIPELINE` in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# mode -> "module:function" under gencnp_jax
MODES = {
    "train_classifier": "stages.import_classifier:classifier_stage",  # or imports a user's model
    "train_generator": "train.generator:train_generator",
    "build_bank": "stages.build_bank:build_bank",
    "evaluate": "stages.evaluate:evaluate",
    "report": "stages.report:make_report",
    "bench": "tools.bench:bench",  # research tools: not in PIPELINE
    "headroom": "tools.headroom:headroom",
    "explain": "stages.explain_images:explain_images",  # given images: not in PIPELINE
}
PIPELINE = ("train_classifier", "train_generator", "build_bank", "evaluate", "report")
ALL = "all"
NAMES = (*MODES, ALL)


def stage_fn(mode: str) -> Callable:
    """The stage function of `mode` (KeyError for an unknown mode)."""
    module, fn = MODES[mode].split(":")
    return getattr(importlib.import_module(f"gencnp_jax.{module}"), fn)
