"""Metric against density: every method and control at fixed densities, one panel per ablation.

Reads the ``at_density`` / ``own_density`` parts of ``eval/results.json`` (plain mappings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from gencnp_jax.viz import plots

OURS = "gencnp"
CONTROLS = ("constant", "class_constant")
REFERENCES = ("class_reference", "instance_reference")  # yardsticks: the best masks found
# Fixed looks for the methods that matter most in reading the figure; others take tab10.
STYLE = {
    OURS: dict(color="C3", marker="*", ms=13, lw=2.6, zorder=5),
    "gencnp_transfer": dict(color="#ff9896", marker="*", ms=9, lw=1.6, ls="--", zorder=4),
    "constant": dict(color="black", marker="s", ms=6, lw=1.4, ls="--", zorder=3),
    "class_constant": dict(color="0.45", marker="D", ms=6, lw=1.4, ls="--", zorder=3),
    "random": dict(color="0.6", marker="x", ms=7, lw=1.2, ls=":", zorder=2),
    "class_reference": dict(color="#1f3a93", marker="^", ms=7, lw=1.6, ls="-.", zorder=4),
    "instance_reference": dict(color="#1f3a93", marker="v", ms=7, lw=1.6, ls=":", zorder=4),
}
OTHER_COLORS = ("C0", "C2", "C4", "C1", "C5", "C6", "C8", "C9")


def number(value) -> float | None:
    """A finite float, or None for missing, null, NaN or non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def get(tree, *keys):
    """``tree[k0][k1]...``, or None when a level is missing or not a mapping (JSON null too)."""
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _maps(values) -> list[Mapping]:
    return [v for v in values if isinstance(v, Mapping)]


def densities(by_density: Mapping) -> list[str]:
    """The density keys of one ablation, in increasing numeric order (unparsable ones skipped)."""
    keys = []
    for key in by_density:
        try:
            keys.append((float(key), key))
        except ValueError:
            continue
    return [key for _, key in sorted(keys)]


SUPPORT = ("constant_", "class_means_", "class_constant_")  # a control's or a gain's tables


def shown(name: str) -> bool:
    """Rows a reader compares (methods, controls, references), not the tables behind them."""
    return not name.startswith(SUPPORT)


def method_order(names) -> list[str]:
    """GEN-CNP first, other methods in given order, the controls, random and the references
    last; the tables behind the controls and gains left out (`shown`)."""
    names = [n for n in dict.fromkeys(names) if shown(n)]
    tail = [n for n in (*CONTROLS, "random", *REFERENCES) if n in names]
    head = [n for n in names if n.startswith(OURS)]
    return head + [n for n in names if n not in head and n not in tail] + tail


def _style(name: str, others: list[str]) -> dict:
    if name in STYLE:
        return dict(STYLE[name])
    i = others.index(name) if name in others else len(others)
    return dict(color=OTHER_COLORS[i % len(OTHER_COLORS)], marker="o", ms=5, lw=1.2, zorder=3)


def plot_metric_vs_density(
    at_density: Mapping[str, Mapping],
    metric: str,
    own_density: Mapping[str, Mapping] | None = None,
    ablations: Sequence[str] = ("mean", "zero"),
    ylabel: str | None = None,
    symlog: bool = False,
):
    """One panel per ablation: `metric` (y) of every method against the fixed density (x).

    GEN-CNP is the thick red line; its pathway at its own density is the separate large star
    (with the spread of its density as a horizontal bar).

    Args:
      at_density: ``ablation -> density_str -> method -> metrics``.
      metric: the metric to draw, e.g. ``"mDC"``.
      own_density: ``ablation -> method -> metrics`` (``density_mean``, ``density_std``).
      ablations: the panels, in order; an ablation absent from both inputs is still drawn
        (empty, saying so), so that the layout is stable.
      ylabel: the y axis label (default: the metric's name).
      symlog: a symmetric-log y axis (log above 1, linear near 0), for metrics spanning decades.

    Returns:
      ``(fig, axes)`` with one axes per ablation.
    """
    own_density = own_density or {}
    fig = plots._figure(6.2 * len(ablations) + 1.8, 4.6)
    axes = fig.subplots(1, len(ablations), squeeze=False, sharey=True)[0]
    all_names = [m for a in _maps(at_density.values()) for d in _maps(a.values()) for m in d]
    order = method_order(all_names)
    others = [n for n in order if n not in STYLE]
    handles = {}
    for ax, ablation in zip(axes, ablations, strict=True):
        by_density = get(at_density, ablation) or {}
        keys = densities(by_density)
        for name in order:
            pts = [(float(k), number(get(by_density, k, name, metric))) for k in keys]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            style = _style(name, others)
            (line,) = ax.plot(xs, ys, label=name, **style)
            handles.setdefault(name, line)
        x = number(get(own_density, ablation, OURS, "density_mean"))
        y = number(get(own_density, ablation, OURS, metric))
        if x is not None and y is not None:
            err = number(get(own_density, ablation, OURS, "density_std"))
            label = f"{OURS} at its own density"
            bar = ax.errorbar(
                x,
                y,
                xerr=err,
                fmt="*",
                ms=20,
                color="C3",
                mec="black",
                mew=1.2,
                capsize=4,
                zorder=6,
                label=label,
            )
            handles.setdefault("own", bar)
            ax.annotate(
                f"own density {x:.3f}",
                (x, y),
                (10, 10),
                textcoords="offset points",
                fontsize=8,
                bbox=plots.LABEL_BOX,
            )
        if not ax.lines and not ax.collections:
            ax.text(0.5, 0.5, f"no {metric} in results.json", ha="center", transform=ax.transAxes)
        ax.set_title(f"{ablation} ablation")
        ax.set_xlabel("fraction of kept neurons (density)")
        ax.grid(alpha=0.3, which="both")
        if symlog:
            ax.set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel(ylabel or metric)
    if handles:
        labels = [h.get_label() for h in handles.values()]
        fig.legend(
            list(handles.values()), labels, loc="outside right upper", frameon=False, fontsize=8
        )
    fig.suptitle(f"{metric} against density (thick red: GEN-CNP; dashed: fixed-mask controls)")
    return fig, axes


def has_metric(at_density: Mapping, metric: str) -> bool:
    """Whether any method at any density of any ablation has a finite `metric`."""
    if not isinstance(at_density, Mapping):
        return False
    return any(
        number(m.get(metric)) is not None
        for a in _maps(at_density.values())
        for d in _maps(a.values())
        for m in _maps(d.values())
    )


def chance_iou(density: float) -> float:
    """Expected IoU of two independent random masks of the same density ``d``: ``d / (2 - d)``."""
    d = float(np.clip(density, 0.0, 1.0))
    return d / (2 - d) if d > 0 else 0.0


def save_density_figures(results: Mapping, out_dir: str) -> dict[str, str]:
    """mDC and agreement against density (every method and control, a panel per ablation) as
    PNGs in `out_dir`: ``caption -> path``; none when results.json has no ``at_density``."""
    at_density = results.get("at_density")
    if not isinstance(at_density, Mapping):
        return {}
    own = results.get("own_density") if isinstance(results.get("own_density"), Mapping) else {}
    figures = {}
    for metric, what, symlog in (
        ("mDC", "mean relative drop in confidence, % (lower = more faithful; symlog)", True),
        ("agreement", "fraction of inputs whose prediction the pathway keeps", False),
    ):
        if not has_metric(at_density, metric):
            continue
        fig, _ = plot_metric_vs_density(
            at_density, metric, own, ylabel=what.split(" (")[0], symlog=symlog
        )
        caption = (
            f"{metric} against density: {what}. Every method and the fixed-mask controls "
            "(constant: one mask for all inputs; class_constant: one per predicted class) at "
            "the same densities; the large star is GEN-CNP at its own density."
        )
        figures[caption] = plots.save(fig, os.path.join(out_dir, f"{metric}_vs_density.png"))
    return figures
