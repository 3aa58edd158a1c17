"""The evaluation scorecard and the per-density table of the report page.

Every row states GEN-CNP's number beside its reference and how the two compare; no verdict
marks: a number that does not favour GEN-CNP is shown as it is. Any part of the results may
be missing (an older ``eval/results.json``): its cells read "–".
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping

from gencnp_jax.viz import cells, curves
from gencnp_jax.viz.cells import MISSING, fmt

OURS, TRANSFER = "gencnp", "gencnp_transfer"
CONTROLS = curves.CONTROLS
REFERENCES = curves.REFERENCES
SCORE_DENSITIES = ("0.1", "0.2", "0.3")  # fixed densities of the faithfulness rows


@dataclasses.dataclass
class Row:
    """One scorecard row: GEN-CNP's `value`, labelled reference values, the better direction."""

    quantity: str
    value: float | None
    refs: list[tuple[str, float | None]]
    better: str | None = None  # "higher" / "lower" / None (no direction)
    note: str = ""


_get = curves.get


def _num(tree, *keys) -> float | None:
    return curves.number(_get(tree, *keys))


def headline_ablation(results: Mapping) -> str:
    """The ablation the generator was trained with (``config.ablation``, else ``"mean"``), or
    the first of ``at_density`` when that lacks it."""
    ablation = _get(results, "config", "ablation")
    ablation = ablation if isinstance(ablation, str) else "mean"
    at_density = _get(results, "at_density")
    if isinstance(at_density, Mapping) and not isinstance(at_density.get(ablation), Mapping):
        return next((a for a, v in at_density.items() if isinstance(v, Mapping)), ablation)
    return ablation


def statement(row: Row) -> str:
    """GEN-CNP's number against the reference hardest to beat, in words; no verdict."""
    refs = [(n, v) for n, v in row.refs if v is not None]
    if row.value is None:
        return "GEN-CNP's number is not in results.json"
    if not refs:
        return f"{fmt(row.value)}; no reference in results.json"
    if row.better in ("higher", "lower"):
        pick = max if row.better == "higher" else min
        name, ref = pick(refs, key=lambda r: r[1])
    else:
        name, ref = refs[0]
    diff = row.value - ref
    scale = max(abs(row.value), abs(ref))
    if abs(diff) <= 1e-9 * max(scale, 1.0):
        text = f"{fmt(row.value)}, equal to {name}"
    else:
        side = "higher" if diff > 0 else "lower"
        text = f"{fmt(row.value)} vs {fmt(ref)} for {name}: {fmt(abs(diff), scale)} {side}"
        if ref != 0 and row.value * ref > 0:
            text += f" ({row.value / ref:.2g}×)"
    return text + (f"; {row.better} is better" if row.better else "")


def _faithfulness(results, ablation) -> list[Row]:
    rows = []
    own = _get(results, "own_density", ablation) or {}
    density = _num(own, OURS, "density_mean") or _num(results, "methods", OURS, "density_mean")
    where = f"own density {fmt(density)}" if density is not None else "own density"
    for metric, better in (("agreement", "higher"), ("mDC", "lower"), ("mIC", "higher")):
        mine = _num(own, OURS, metric)
        if mine is None and ablation == headline_ablation(results):
            mine = _num(results, "methods", OURS, metric)
        refs = [(c, _num(own, c, metric)) for c in (*CONTROLS, "random")]
        rows.append(Row(f"{metric} at {where}", mine, refs, better))
        for d in SCORE_DENSITIES:
            at = _get(results, "at_density", ablation, d) or {}
            on_ref = _get(results, "on_reference_images", d) or {}
            refs = [(c, _num(at, c, metric)) for c in (*CONTROLS, "random", "class_reference")]
            if metric == "mDC" and _num(on_ref, "instance_reference", "mDC") is not None:
                # like for like: both on the instance reference's images
                refs.append(("instance_reference", _num(on_ref, "instance_reference", "mDC")))
                n_ref = _num(results, "references", "num_examples_instance")
                mine_there = fmt(_num(on_ref, OURS, "mDC"))
                images = "?" if n_ref is None else f"{n_ref:.0f}"
                note = f"instance_reference on its {images} images; GEN-CNP there: {mine_there}"
            else:
                note = ""
            rows.append(Row(f"{metric} at density {d}", _num(at, OURS, metric), refs, better, note))
    return rows


def _specificity(results, ablation) -> list[Row]:
    own = _get(results, "own_density", ablation) or {}
    std = _num(own, OURS, "density_std")
    std = std if std is not None else _num(results, "methods", OURS, "density_std")
    refs = [(c, _num(own, c, "density_std")) for c in CONTROLS]
    note = "0 would mean every input keeps as many neurons (a fixed mask)"
    rows = [Row("density_std (spread of density over inputs)", std, refs, None, note)]
    gains = _gains(results, ablation)
    own_means = _get(results, "specificity_gain", "vs_own_class_means") or {}
    for d in curves.densities(gains):
        at = gains[d] if isinstance(gains[d], Mapping) else {}
        others = [(m, curves.number(v)) for m, v in at.items() if m != OURS]
        others = [r for r in others if r[1] is not None and m_is_method(r[0])]
        best = [max(others, key=lambda r: r[1])] if others else []  # the best other method
        refs = [("the class reference itself", 1.0)] + [(f"best other: {m}", v) for m, v in best]
        own = _num(own_means, d, OURS)
        note = "mDC(class reference) / mDC(method): 1 = as good as the best class mask found"
        if own is not None:
            note += f"; against its own class means: {fmt(own)}"
        rows.append(Row(f"specificity_gain at density {d}", _num(at, OURS), refs, "higher", note))
    return rows


def m_is_method(name: str) -> bool:
    """A per-instance method row (not a control, a class table or a reference)."""
    return name not in (*CONTROLS, *REFERENCES) and not name.startswith(
        ("constant_", "class_means_", "class_constant_")
    )


def _gains(results, ablation) -> Mapping:
    """``density -> method -> gain``: against the class reference for the headline ablation
    (where it exists), else against the class_constant control; older results: as stored."""
    gains = _get(results, "specificity_gain")
    if not isinstance(gains, Mapping):
        return {}
    if "vs_class_reference" in gains and ablation == headline_ablation(results):
        return gains["vs_class_reference"] or {}
    if "vs_class_constant" in gains:
        return _get(gains, "vs_class_constant", ablation) or {}
    return _get(gains, ablation) or {}


def _class_relevance(results, ablation) -> list[Row]:
    def metric(method, key):
        value = _num(results, "own_density", ablation, method, key)
        return value if value is not None else _num(results, "methods", method, key)

    rows = [
        Row(
            "acIOU: IoU of same-class pathways",
            metric(OURS, "acIOU"),
            [("inter_class_iou (different classes)", metric(OURS, "inter_class_iou"))],
            "higher",
            "the reference is GEN-CNP's own overlap of different-class pathways",
        ),
    ]
    for key, better in (("agreement", "higher"), ("other_class_drop", "higher")):
        refs = [(c, metric(c, key)) for c in ("class_constant", OURS)]
        rows.append(Row(f"{TRANSFER} {key}", metric(TRANSFER, key), refs, better))
    density = metric(TRANSFER, "density_mean")
    near = _nearest(_get(results, "random_reference", ablation) or {}, density)
    refs = [
        (
            f"random masks at density {near}",
            _num(results, "random_reference", ablation, near, "class_leakage"),
        )
    ]
    refs += [(c, metric(c, "class_leakage")) for c in ("class_constant",)]
    rows.append(Row(f"{TRANSFER} class_leakage", metric(TRANSFER, "class_leakage"), refs, "lower"))
    return rows


def _nearest(by_density: Mapping, density: float | None) -> str | None:
    keys = curves.densities(by_density)
    if not keys:
        return None
    if density is None:
        return keys[0]
    return min(keys, key=lambda k: abs(float(k) - density))


def _honesty(results, ablation) -> list[Row]:
    rows = []
    reference = _get(results, "random_reference", ablation) or {}
    own = _num(results, "own_density", ablation, OURS, "leakage")
    own = own if own is not None else _num(results, "methods", OURS, "leakage")
    density = _num(results, "own_density", ablation, OURS, "density_mean")
    near = _nearest(reference, density)
    refs = [(f"random masks at density {near}", _num(reference, near, "leakage"))]
    refs.append(
        ("random (own density)", _num(results, "own_density", ablation, "random", "leakage"))
    )
    rows.append(Row("leakage at own density", own, refs, "lower"))
    for d in curves.densities(reference):
        mine = _num(results, "at_density", ablation, d, OURS, "leakage")
        refs = [(f"random masks at density {d}", _num(reference, d, "leakage"))]
        rows.append(Row(f"leakage at density {d}", mine, refs, "lower"))
    null = _num(results, "own_density", ablation, OURS, "null_confidence")
    null = null if null is not None else _num(results, "methods", OURS, "null_confidence")
    refs = [("the full model on the blank image", _num(results, "null_confidence_full_model"))]
    rows.append(Row("null_confidence (class confidence on a blank image)", null, refs, "lower"))
    return rows


def _sanity(results) -> list[Row]:
    sanity = _get(results, "sanity") or {}
    iou = _num(sanity, "gencnp_retrained_iou")
    iou = iou if iou is not None else _num(results, "sanity_iou")
    note = "IoU of GEN-CNP's pathways and a generator retrained on a randomised classifier"
    rows = [Row("IoU with a retrained generator (randomised classifier)", iou, [], "lower", note)]
    mine, mct = (
        _get(sanity, "gencnp_retrained_iou_at_density"),
        _get(sanity, "neuron_mct_iou_at_density"),
    )
    both = [t for t in (mine, mct) if isinstance(t, Mapping)]
    for d in curves.densities({k: None for t in both for k in t}):
        refs = [
            ("neuron_mct, randomised", _num(mct, d)),
            ("chance (two random masks)", curves.chance_iou(float(d))),
        ]
        rows.append(Row(f"randomisation IoU at density {d}", _num(mine, d), refs, "lower"))
    feats = _num(sanity, "gencnp_features_iou")
    rows.append(Row("IoU of pathways from randomised-classifier features", feats, [], "lower"))
    return rows


def sections(results: Mapping) -> list[tuple[str, list[Row]]]:
    """The scorecard: ``(section title, rows)`` for the headline ablation."""
    ablation = headline_ablation(results)
    return [
        ("Faithfulness", _faithfulness(results, ablation)),
        ("Instance specificity", _specificity(results, ablation)),
        ("Class relevance", _class_relevance(results, ablation)),
        ("Honesty", _honesty(results, ablation)),
        ("Sanity", _sanity(results)),
    ]


def _refs_text(refs) -> str:
    return "; ".join(f"{name} {fmt(value)}" for name, value in refs) or MISSING


def scorecard_html(results: Mapping) -> str:
    """The scorecard as an HTML table, one header row per section."""
    e = html.escape
    body = []
    for title, rows in sections(results):
        body.append(f'<tr class="section"><th colspan="4">{e(title)}</th></tr>')
        for r in rows:
            note = f'<br><span class="muted">{e(r.note)}</span>' if r.note else ""
            refs, text = e(_refs_text(r.refs)), e(statement(r))
            body.append(
                f"<tr><td>{e(r.quantity)}{note}</td><td>{e(fmt(r.value))}</td>"
                f'<td class="text">{refs}</td><td class="text">{text}</td></tr>'
            )
    ablation = e(headline_ablation(results))
    return (
        f'<p class="muted">GEN-CNP against its references under {ablation} ablation. '
        "The statement compares with the reference hardest to beat.</p>"
        '<div class="scroll"><table class="scorecard"><thead><tr><th>quantity</th>'
        '<th>GEN-CNP</th><th class="text">reference</th><th class="text">statement</th>'
        "</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def per_density_html(results: Mapping, ablation: str | None = None) -> str | None:
    """Every method at every fixed density of one ablation (the headline one by default), or
    None when results.json has no ``at_density`` for it."""
    ablation = ablation or headline_ablation(results)
    by_density = _get(results, "at_density", ablation)
    if not isinstance(by_density, Mapping) or not curves.densities(by_density):
        return None
    gains = _gains(results, ablation)
    tables = {}
    for d in curves.densities(by_density):
        at = by_density[d] if isinstance(by_density[d], Mapping) else {}
        rows = {
            m: dict(at[m]) if isinstance(at[m], Mapping) else {} for m in curves.method_order(at)
        }
        at_gain = _get(gains, d)
        for m, gain in at_gain.items() if isinstance(at_gain, Mapping) else ():
            if m in rows:
                rows[m]["specificity_gain"] = gain
        tables[d] = rows
    cols = cells.columns({f"{d}/{m}": r for d, rows in tables.items() for m, r in rows.items()})
    e = html.escape
    head = "".join(f"<th>{cells.header_html(c)}</th>" for c in cols)
    body = []
    for d, rows in tables.items():
        body.append(f'<tr class="section"><th colspan="{len(cols) + 1}">density {e(d)}</th></tr>')
        for m, row_cells in cells.cells(rows, cols).items():
            cls = "ours" if m.startswith(OURS) else "control" if m in CONTROLS else ""
            tds = "".join(f"<td>{e(c)}</td>" for c in row_cells)
            body.append(f'<tr class="{cls}"><td>{e(m)}</td>{tds}</tr>')
    return (
        f'<p class="muted">{e(ablation)} ablation; every method at the same fixed densities.</p>'
        f'<div class="scroll"><table><thead><tr><th>method</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )
