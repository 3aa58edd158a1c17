"""Tests of the static report page and the Markdown results table (report.py).

The page must open from disk: every link resolves, nothing is fetched, all text is escaped.
"""

import json
import os
import re

import numpy as np

from gencnp_jax.viz import curves, plots, scorecard
from gencnp_jax.viz import html as report

RESULTS = {
    "split": "test",
    "num_examples": 10000,
    "methods": {
        "gencnp": {"mIC": 12.5, "mDC": 3.25, "agreement": 0.987, "density_mean": 0.1234},
        "gencnp_transfer": {"mDC": 7.5, "class_leakage": 0.02, "other_class_drop": 0.4},
        "cdrp": {"mIC": 4.0, "mDC": 6.0, "agreement": float("nan"), "seconds_per_image": 2e-5},
    },
    "sanity_iou": 0.12,
}


def _png(path):
    fig, _ = plots.plot_density_hist(np.linspace(0, 1, 10))
    return plots.save(fig, str(path))


def test_report_page(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "classifier").mkdir(parents=True)
    (workdir / "classifier" / "metrics.json").write_text(json.dumps({"test/accuracy": 0.9125}))
    (workdir / "bench.json").write_text(json.dumps({"step": {"seconds": 0.5}}))
    outside = _png(tmp_path / "elsewhere" / "density.png")  # copied beside the page
    beside = _png(workdir / "report" / "dvm.png")  # already there: linked, not copied
    figures = {"density <hist>": outside, "density vs mDC": "dvm.png", "gone": "/nope/x.png"}
    gallery = [{"image": outside, "caption": "sample 0", "density": 0.25}]
    path = report.write_report(str(workdir), RESULTS, figures, "a = '<b>'\n", gallery)

    assert path == str(workdir / "report" / "index.html") and os.path.isfile(beside)
    page = open(path, encoding="utf-8").read()
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert any(link.endswith(".png") for link in links)
    for link in links:
        if link.startswith("#"):
            assert f'id="{link[1:]}"' in page
        else:
            assert os.path.isfile(os.path.join(workdir, "report", link)), link
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for name in RESULTS["methods"]:
        assert f"<td>{name}</td>" in page
    assert "3.25" in page and "0.123" in page and report.MISSING in page
    assert "0.912" in page and "step/seconds" in page  # classifier metrics and bench
    assert "&lt;hist&gt;" in page and "&lt;b&gt;" in page  # escaped caption and config
    assert "missing figure" in page and "Generator training" not in page


def test_results_markdown():
    md = report.results_markdown(RESULTS)
    lines = md.splitlines()
    assert lines[0].startswith("| method | mIC ↑ | mDC ↓")
    assert lines[1].startswith("|---|")
    rows = [line for line in lines if line.startswith("| gencnp") or line.startswith("| cdrp")]
    assert len(rows) == 3 and all(line.count("|") == lines[0].count("|") for line in rows)
    assert "| cdrp | 4.00 | 6.000 | – |" in md  # decimals per column; NaN is missing
    assert "sanity_iou: 0.120" in md


def test_fmt():
    assert report.fmt(None) == report.MISSING and report.fmt(float("nan")) == report.MISSING
    assert report.fmt(10000) == "10000" and report.fmt(np.float32(0.5)) == "0.500"
    assert report.fmt(3.0, scale=50.0) == "3.00" and report.fmt(2e-5) == "2.00e-05"


DENSITIES = ("0.05", "0.1", "0.2", "0.3")
ALL_METHODS = (
    "gencnp", "gencnp_transfer", "cdrp", "neuron_mct", "neuron_mct_signed", "neuron_intgrad",
    "topk_activation", "random", "constant", "class_constant",
)  # fmt: skip


def fabricated_results(seed: int = 0) -> dict:
    """A results.json of the fixed-density schema, with made-up but plausible numbers."""
    rng = np.random.default_rng(seed)

    def metrics(method, d):
        strength = {"gencnp": 0.9, "class_constant": 0.95, "random": 0.1}.get(method, 0.6)
        agree = float(np.clip(strength * (0.6 + d) + rng.normal(0, 0.02), 0, 1))
        return {
            "mDC": float(100 * (1 - agree) ** 2 + rng.random()),
            "mIC": float(30 * agree),
            "agreement": agree,
            "leakage": float(0.05 + 0.1 * rng.random()),
            "class_leakage": float(0.1 * rng.random()),
            "density_mean": d,
            "acIOU": float(0.3 + 0.3 * rng.random()),
            "inter_class_iou": float(0.2 * rng.random()),
        }

    at_density = {
        a: {d: {m: metrics(m, float(d)) for m in ALL_METHODS} for d in DENSITIES}
        for a in ("mean", "zero")
    }
    own = {
        a: {
            m: {**metrics(m, 0.13), "density_std": 0.0 if "constant" in m else 0.03}
            for m in ALL_METHODS
        }
        for a in ("mean", "zero")
    }
    methods = {
        m: {**own["mean"][m], "null_confidence": 0.2, "other_class_drop": 0.3, "necessity_drop": 40}
        for m in ALL_METHODS
    }
    return {
        "split": "test",
        "num_examples": 10000,
        "methods": methods,
        "at_density": at_density,
        "own_density": own,
        "specificity_gain": {
            a: {d: {m: float(rng.normal(0, 0.02)) for m in ALL_METHODS} for d in DENSITIES}
            for a in ("mean", "zero")
        },
        "random_reference": {
            a: {d: {"leakage": 0.08, "class_leakage": 0.05} for d in DENSITIES}
            for a in ("mean", "zero")
        },
        "null_confidence_full_model": 0.35,
        "sanity": {
            "gencnp_retrained_iou": 0.12,
            "gencnp_retrained_iou_at_density": {d: 0.1 for d in DENSITIES},
            "neuron_mct_iou_at_density": {d: 0.3 for d in DENSITIES},
            "gencnp_features_iou": 0.2,
        },
        "config": {"ablation": "mean", "densities": [float(d) for d in DENSITIES]},
    }


def test_scorecard_rows_and_statements():
    results = fabricated_results()
    sections = dict(scorecard.sections(results))
    assert list(sections) == [
        "Faithfulness", "Instance specificity", "Class relevance", "Honesty", "Sanity",
    ]  # fmt: skip
    quantities = [r.quantity for rows in sections.values() for r in rows]
    for q in ("mDC at density 0.1", "agreement at density 0.2", "mIC at own density 0.130",
              "specificity_gain at density 0.05", "gencnp_transfer class_leakage",
              "leakage at density 0.3", "randomisation IoU at density 0.2"):  # fmt: skip
        assert q in quantities, q
    assert all(r.value is not None for rows in sections.values() for r in rows)
    # The statement compares with the reference hardest to beat, whichever way it goes.
    row = scorecard.Row("mDC", 3.0, [("constant", 2.0), ("random", 50.0)], "lower")
    assert (
        scorecard.statement(row)
        == "3.000 vs 2.000 for constant: 1.000 higher (1.5×); lower is better"
    )
    row = scorecard.Row("agreement", 0.9, [("class_constant", 0.95), ("random", None)], "higher")
    assert "for class_constant: 0.050 lower" in scorecard.statement(row)
    assert "not in results.json" in scorecard.statement(scorecard.Row("x", None, [], "lower"))
    assert (
        scorecard.statement(scorecard.Row("x", 0.5, [], None))
        == "0.500; no reference in results.json"
    )


def test_density_curves(tmp_path):
    results = fabricated_results()
    fig, axes = curves.plot_metric_vs_density(
        results["at_density"], "mDC", results["own_density"], symlog=True
    )
    assert [ax.get_title() for ax in axes] == ["mean ablation", "zero ablation"]
    assert axes[0].get_yscale() == "symlog"
    labels = {line.get_label() for line in axes[0].lines}
    assert set(ALL_METHODS) <= labels
    ours = next(line for line in axes[0].lines if line.get_label() == "gencnp")
    assert ours.get_linewidth() == max(line.get_linewidth() for line in axes[0].lines)
    assert any("own density" in t.get_text() for t in axes[0].texts)
    _png_ok(plots.save(fig, str(tmp_path / "mdc.png")))
    fig, axes = curves.plot_metric_vs_density({"mean": results["at_density"]["mean"]}, "agreement")
    assert not axes[1].lines and "no agreement" in axes[1].texts[0].get_text()
    _png_ok(plots.save(fig, str(tmp_path / "agreement.png")))
    assert curves.has_metric(results["at_density"], "mDC") and not curves.has_metric({}, "mDC")
    assert curves.densities({"0.3": 0, "0.05": 0, "x": 0}) == ["0.05", "0.3"]
    assert abs(curves.chance_iou(0.1) - 0.1 / 1.9) < 1e-12


def _png_ok(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def _sections(page):
    return re.findall(r'<h2 id="([^"]+)"', page)


def test_report_page_with_fixed_densities(tmp_path):
    results = fabricated_results()
    workdir = tmp_path / "run"
    fig, _ = curves.plot_metric_vs_density(results["at_density"], "mDC", results["own_density"])
    png = plots.save(fig, str(workdir / "report" / "mDC_vs_density.png"))
    path = report.write_report(str(workdir), results, {}, "", None, {"mDC vs density": png})
    page = open(path, encoding="utf-8").read()
    assert _sections(page)[:4] == ["results", "density", "scorecard", "per_density"]
    assert 'src="mDC_vs_density.png"' in page
    for title in ("Faithfulness", "Instance specificity", "Class relevance", "Honesty", "Sanity"):
        assert f'<th colspan="4">{title}</th>' in page
    for d in DENSITIES:
        assert f"density {d}</th>" in page
    assert page.count("<td>class_constant</td>") == len(DENSITIES) + 1  # per density + own
    assert "random_reference" not in page  # nested tables stay out of the one-line extras
    assert "✓" not in page and "✔" not in page  # statements, not verdict marks


def test_report_page_with_parts_missing(tmp_path):
    results = fabricated_results()
    for key in ("at_density", "specificity_gain", "sanity", "random_reference"):
        del results[key]
    del results["own_density"]["mean"]
    results["methods"]["gencnp"].pop("leakage")
    page = open(report.write_report(str(tmp_path), results, {}, ""), encoding="utf-8").read()
    assert "scorecard" in _sections(page) and "per_density" not in _sections(page)
    assert "mDC at density 0.1</td><td>–</td>" in page
    assert "leakage at own density</td><td>–</td>" in page
    assert "GEN-CNP&#x27;s number is not in results.json" in page
    # An old results.json: only methods and a flat sanity_iou.
    page = open(report.write_report(str(tmp_path), RESULTS, {}, ""), encoding="utf-8").read()
    assert "0.120" in page and "Scorecard" in page
    # The generator's own metrics (no evaluation yet): no scorecard.
    own = {"source": "generator/metrics.json", "methods": {"gencnp": {"mDC": 1.0}}}
    page = open(report.write_report(str(tmp_path), own, {}, ""), encoding="utf-8").read()
    assert "scorecard" not in _sections(page)


def test_report_page_survives_odd_values(tmp_path):
    results = fabricated_results()
    results["at_density"]["mean"]["0.1"]["cdrp"] = None  # JSON null
    results["at_density"]["zero"] = None
    results["specificity_gain"]["mean"]["0.2"] = 3.0
    results["sanity"]["neuron_mct_iou_at_density"] = [0.1]
    results["own_density"]["mean"]["gencnp"]["mDC"] = None
    results["config"]["ablation"] = "zero"  # not among at_density's ablations with data
    figures = curves.save_density_figures(results, str(tmp_path / "report"))
    assert len(figures) == 2
    page = open(report.write_report(str(tmp_path), results, {}, "", None, figures)).read()
    assert "Scorecard" in page and "under mean ablation" in page  # the one with data
    assert "Results at fixed densities" in page


def test_report_marks_a_degenerate_row_and_reads_the_references(tmp_path):
    results = fabricated_results()
    results["flags"] = {"cdrp": ["own density 1.00: it keeps every channel"]}
    for d in DENSITIES:  # the references and the gains against them (the new schema)
        results["at_density"]["mean"][d]["class_reference"] = {"mDC": 5.0, "agreement": 0.9}
        results["at_density"]["mean"][d]["instance_reference"] = {"mDC": 4.0}
    results["on_reference_images"] = {d: {"instance_reference": {"mDC": 4.0}} for d in DENSITIES}
    results["references"] = {"num_examples_instance": 256}
    results["specificity_gain"] = {
        "vs_class_reference": {d: {"gencnp": 0.5, "cdrp": 2.0} for d in DENSITIES},
        "vs_own_class_means": {d: {"gencnp": 1.1} for d in DENSITIES},
        "vs_class_constant": {a: {d: {"gencnp": 0.9} for d in DENSITIES} for a in ("mean", "zero")},
    }
    page = open(report.write_report(str(tmp_path), results, {}, "")).read()
    assert "cdrp <span" in page and "⚠ degenerate: own density 1.00" in page
    rows = dict(scorecard.sections(results))["Faithfulness"]
    mdc = next(r for r in rows if r.quantity == "mDC at density 0.1")
    assert ("instance_reference", 4.0) in mdc.refs and ("class_reference", 5.0) in mdc.refs
    assert "instance_reference on its 256 images" in mdc.note
    gains = dict(scorecard.sections(results))["Instance specificity"]
    gain = next(r for r in gains if r.quantity == "specificity_gain at density 0.1")
    assert gain.value == 0.5 and ("best other: cdrp", 2.0) in gain.refs
    assert "against its own class means: 1.10" in gain.note
