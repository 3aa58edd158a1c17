"""The run report: one static HTML page (tables, figures, gallery, config) and a Markdown table.

The page opens from disk: inline CSS, no scripts, no network; images sit beside it.
"""

from __future__ import annotations

import filecmp
import html
import json
import os
import shutil
from collections.abc import Mapping, Sequence

from gencnp_jax.viz import cells as cells_lib
from gencnp_jax.viz import curves as curves_lib
from gencnp_jax.viz import scorecard
from gencnp_jax.viz.cells import ARROW, METRICS, MISSING, fmt  # noqa: F401 (re-exported)

CSS = """
.warn { color: #b00020; font-weight: 600; }
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:1em 2em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #1f77b4}h2{margin-top:1.6em;color:#1f4e79}
nav a{margin-right:1em}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#eef3f8;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
td{background:#fff}tr:nth-child(even) td{background:#fafafa}
td:first-child,th:first-child{position:sticky;left:0}tr.ours td{background:#fff4e5;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em}.gallery{display:flex;flex-wrap:wrap;gap:1em}
.gallery figure{flex:1 1 320px;max-width:560px}.muted{color:#777;font-size:.9em}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.85em}
tr.section th{background:#1f4e79;color:#fff;text-align:left}
.text{text-align:left;white-space:normal}
table.scorecard td:first-child{white-space:normal;min-width:16em}tr.control td{font-style:italic}
"""


def _scalars(results: Mapping) -> dict:
    """The top-level entries of the results that fit on one line (no nested tables)."""
    return {k: v for k, v in results.items() if not isinstance(v, Mapping | list | tuple)}


def results_markdown(results: Mapping) -> str:
    """The methods-by-metrics table of ``eval/results.json`` as Markdown (``eval/results.md``)."""
    methods = results.get("methods", {})
    cols = cells_lib.columns(methods)
    lines = ["| method | " + " | ".join(cells_lib.header(c) for c in cols) + " |"]
    lines.append("|---|" + "---:|" * len(cols))
    for name, cells in cells_lib.cells(methods, cols).items():
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    extra = [f"{k}: {fmt(v)}" for k, v in _scalars(results).items()]
    return "\n".join(lines) + ("\n\n" + ", ".join(extra) + "\n" if extra else "\n")


def _results_html(results: Mapping) -> str:
    methods = {
        name: row
        for name, row in results.get("methods", {}).items()
        if curves_lib.shown(name.removesuffix("_zero_ablation"))
    }
    cols = cells_lib.columns(methods)
    e = html.escape
    # <wbr> lets long metric names wrap at their underscores, so the table fits the page.
    head = "".join(
        f'<th title="{e(METRICS.get(c, ("",))[0])}">{cells_lib.header_html(c)}</th>' for c in cols
    )
    rows = []
    flags = results.get("flags") or {}
    for name, cells in cells_lib.cells(methods, cols).items():
        cls = ' class="ours"' if name.startswith("gencnp") else ""
        tds = "".join(f"<td>{e(cell)}</td>" for cell in cells)
        label = e(name)
        if name in flags:  # a degenerate row: its numbers are not a result
            reasons = "; ".join(flags[name])
            label += f' <span class="warn" title="{e(reasons)}">⚠ degenerate: {e(reasons)}</span>'
        rows.append(f"<tr{cls}><td>{label}</td>{tds}</tr>")
    extra = ", ".join(f"{e(k)}: {e(fmt(v))}" for k, v in _scalars(results).items())
    legend = "".join(
        f"<li><b>{e(c)}</b>{ARROW[METRICS[c][1]]}: {e(METRICS[c][0])}</li>"
        for c in cols
        if c in METRICS
    )
    return (
        f'<p class="muted">{extra}</p><div class="scroll"><table><thead><tr><th>method</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        f'<details><summary>metric definitions</summary><ul class="muted">{legend}</ul></details>'
    )


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kv_table(tree: Mapping) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(str(k))}</td><td>{e(fmt(v) if not isinstance(v, list) else str(v))}</td></tr>"
        for k, v in _flatten(tree).items()
    )
    return f'<div class="scroll"><table><tbody>{rows}</tbody></table></div>'


def _load_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _local_image(path: str, report_dir: str) -> str | None:
    """The image's path relative to the report dir, copying it there if it lives elsewhere."""
    beside = path if os.path.isabs(path) else os.path.join(report_dir, path)
    if os.path.isfile(beside) and os.path.abspath(beside).startswith(report_dir + os.sep):
        return os.path.relpath(beside, report_dir)
    if not os.path.isfile(path):
        return None
    os.makedirs(os.path.join(report_dir, "figures"), exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    dest, n = os.path.join(report_dir, "figures", stem + ext), 1
    while os.path.exists(dest) and not filecmp.cmp(path, dest, shallow=False):
        dest, n = os.path.join(report_dir, "figures", f"{stem}_{n}{ext}"), n + 1  # name clash
    shutil.copyfile(path, dest + ".tmp")  # renamed into place once whole
    os.replace(dest + ".tmp", dest)
    return os.path.relpath(dest, report_dir)


def _figure_html(path: str, caption: str, report_dir: str) -> str:
    e = html.escape
    rel = _local_image(path, report_dir)
    if rel is None:
        return f'<p class="muted">missing figure: {e(caption)} ({e(path)})</p>'
    src = e("/".join(rel.split(os.sep)))
    cap = e(caption)
    return f'<figure><img src="{src}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _evaluation_sections(results: Mapping, figures: Mapping[str, str], report_dir: str):
    """Metric-against-density figures, the scorecard and the per-density table; the scorecard
    only for an evaluation's results (not the generator's own metrics), the table only when
    results.json has fixed densities."""
    out = []
    if figures:
        body = "".join(_figure_html(p, cap, report_dir) for cap, p in figures.items())
        out.append(("density", "Against density", body))
    if "source" not in results:
        out.append(("scorecard", "Scorecard", scorecard.scorecard_html(results)))
    table = scorecard.per_density_html(results)
    if table is not None:
        out.append(("per_density", "Results at fixed densities", table))
    return out


def _timings_html(spent: Mapping) -> str:
    """``timings.json`` as one table: every stage, then its phases indented by depth."""
    rows = []
    for entry in spent.values():
        phases = entry.get("phases", {})
        for path, seconds in sorted(phases.items()):
            depth = path.count("/")
            name = path.rsplit("/", 1)[-1]
            style = "font-weight:600" if depth == 0 else f"padding-left:{1.2 * depth:.1f}em"
            rows.append(
                f'<tr><td class="text" style="{style}">{html.escape(name)}</td>'
                f"<td>{seconds:.1f}</td></tr>"
            )
    return (
        '<div class="scroll"><table><thead><tr><th>stage / phase</th><th>seconds</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def write_report(
    workdir: str,
    results: Mapping,
    figures: Mapping[str, str],
    config_text: str,
    gallery: Sequence[Mapping] | None = None,
    evaluation_figures: Mapping[str, str] | None = None,
) -> str:
    """Writes ``WORKDIR/report/index.html`` and returns its path.

    Args:
      workdir: the run's folder; ``classifier/metrics.json``, ``generator/metrics.json`` and
        ``bench.json`` in it are shown when present.
      results: the evaluation results (the content of ``eval/results.json``).
      figures: caption -> PNG path (relative to the report folder, or elsewhere: then copied
        into ``report/figures/``).
      config_text: the run's config, shown verbatim.
      gallery: sample explanations, each ``{"image": PNG path, "caption": str, ...}``; other
        keys are listed under the image.
      evaluation_figures: caption -> PNG path of the metric-against-density figures, shown
        with the scorecard.

    Returns:
      The path of ``index.html``.
    """
    report_dir = os.path.abspath(os.path.join(workdir, "report"))
    os.makedirs(report_dir, exist_ok=True)
    e = html.escape
    sections = [("results", "Results at each method's own density", _results_html(results))]
    sections += _evaluation_sections(results, evaluation_figures or {}, report_dir)
    if figures:
        body = "".join(_figure_html(p, cap, report_dir) for cap, p in figures.items())
        sections.append(("figures", "Figures", body))
    if gallery:
        items = []
        for item in gallery:
            fig = _figure_html(item["image"], str(item.get("caption", "")), report_dir)
            rest = {k: v for k, v in item.items() if k not in ("image", "caption")}
            items.append(f"<div>{fig}{_kv_table(rest) if rest else ''}</div>")
        sections.append(
            ("gallery", "Sample gallery", f'<div class="gallery">{"".join(items)}</div>')
        )
    for key, title, rel in (
        ("classifier", "Classifier", "classifier/metrics.json"),
        ("generator", "Generator training", "generator/metrics.json"),
        ("bench", "Benchmark", "bench.json"),
    ):
        data = _load_json(os.path.join(workdir, rel))
        if data is not None:
            sections.append((key, title, _kv_table(data)))
    spent = _load_json(os.path.join(workdir, "timings.json"))
    if spent:
        sections.append(("timings", "Where the time went", _timings_html(spent)))
    sections.append(("config", "Config", f"<pre>{e(config_text)}</pre>"))
    nav = "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<h2 id="{sid}">{e(title)}</h2>{content}' for sid, title, content in sections)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>GEN-CNP report</title><style>{CSS}</style></head><body>"
        f'<h1>GEN-CNP report</h1><p class="muted">{e(os.path.abspath(workdir))}</p>'
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
    path = os.path.join(report_dir, "index.html")
    tmp = f"{path}.tmp{os.getpid()}"  # renamed into place once whole: never half a page
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
