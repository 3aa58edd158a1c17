"""Table cells of the report: the known metrics, their direction, and number formatting."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

# Known metrics, in table order: (description, which direction is better).
METRICS = {
    "mIC": ("% of instances whose confidence rises under the pathway", "higher"),
    "mDC": ("mean relative drop in confidence under the pathway, %", "lower"),
    "agreement": ("fraction predicting the same class under the pathway", "higher"),
    "density_mean": ("mean fraction of kept neurons", "lower"),
    "density_std": ("spread of density over instances", "context"),
    "acIOU": ("mean IoU of same-class pathways", "higher"),
    "inter_class_iou": ("mean IoU of different-class pathways", "lower"),
    "necessity_drop": ("confidence drop when the pathway is removed", "higher"),
    "deletion_auc": ("confidence AUC while deleting neurons by score", "lower"),
    "insertion_auc": ("confidence AUC while inserting neurons by score", "higher"),
    "leakage": ("pathway of x makes other-class x' predict x's class", "lower"),
    "null_confidence": ("class confidence of the pathway on a blank image", "lower"),
    "class_leakage": ("class pathway turns other-class samples into its class", "lower"),
    "other_class_drop": ("class pathway lowers other classes' own confidence", "higher"),
    "seconds_per_image": ("explanation time per image", "lower"),
    "specificity_gain": ("what the per-input pathway adds over one mask per class", "higher"),
}
ARROW = {"higher": " ↑", "lower": " ↓", "context": ""}
MISSING = "–"


def fmt(value, scale: float | None = None) -> str:
    """A number for a table cell: NaN/None -> "–", ints as is, floats to a readable precision.

    Args:
      value: the number (or any value, shown with ``str``).
      scale: the largest magnitude in the value's column, so that a column shares its decimals.
    """
    value = value.item() if hasattr(value, "item") else value  # numpy / jax scalars
    if value is None or isinstance(value, bool):
        return MISSING if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING if math.isnan(value) else str(value)
        mag = abs(value)
        ref = max(mag, scale or 0.0)
        if mag == 0:
            return "0"
        if mag < 1e-3 or ref >= 1e5:
            return f"{value:.2e}"
        return f"{value:.{3 if ref < 10 else 2 if ref < 1000 else 0}f}"
    return str(value)


def header(metric: str) -> str:
    return metric + ARROW[METRICS[metric][1]] if metric in METRICS else metric


def header_html(metric: str) -> str:
    """The escaped header; ``<wbr>`` lets long metric names wrap at their underscores."""
    return html.escape(header(metric)).replace("_", "_<wbr>")


def cells(methods: Mapping[str, Mapping], cols: list[str]) -> dict[str, list[str]]:
    """Formatted table cells per method, each column with its own precision."""
    scale = {}
    for c in cols:
        vals = [abs(float(m[c])) for m in methods.values() if isinstance(m.get(c), int | float)]
        scale[c] = max([v for v in vals if math.isfinite(v)], default=None)
    return {name: [fmt(m.get(c), scale[c]) for c in cols] for name, m in methods.items()}


def columns(methods: Mapping[str, Mapping]) -> list[str]:
    seen = {k for m in methods.values() for k in m}
    return [k for k in METRICS if k in seen] + sorted(seen - set(METRICS))
