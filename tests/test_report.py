"""Tests of the static report page and the Markdown results table (report.py).

The page must open from disk: every link resolves, nothing is fetched, all text is escaped.
"""

import json
import os
import re

import numpy as np

from gencnp_jax.viz import html as report
from gencnp_jax.viz import plots

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
