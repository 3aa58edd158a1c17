"""Tests of the report stage (report_stage.py) on the session's trained tiny run.

The page must open from disk: every link resolves and every figure is a real PNG; sections
whose inputs are absent (bank, eval results) are left out rather than failing.
"""

import copy
import json
import os
import re
import shutil

import numpy as np
import pytest

from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs, loading
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.stages import build_bank, validation
from gencnp_jax.stages import report as report_stage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = {
    "split": "test",
    "num_examples": 64,
    "methods": {
        "gencnp": {"mIC": 30.0, "mDC": 1.5, "agreement": 1.0, "density_mean": 0.6},
        "cdrp": {"mIC": 20.0, "mDC": 4.0, "agreement": 0.9, "density_mean": 0.4},
        "random": {"mIC": 1.0, "mDC": 60.0, "agreement": 0.2, "density_mean": 0.6},
    },
    "sanity_iou": 0.1,
    # The fixed-density part of the schema, for one ablation only (the other is missing).
    "at_density": {
        "mean": {
            d: {m: {"mDC": 50 * (1 - x), "agreement": x} for m in ("gencnp", "constant")}
            for d, x in (("0.1", 0.5), ("0.2", 0.7))
        }
    },
    "own_density": {"mean": {"gencnp": {"mDC": 1.5, "agreement": 1.0, "density_mean": 0.6}}},
}


@pytest.fixture(name="run")
def fixture_run(generator_workdir, tmp_path):
    """A private copy of the trained tiny run (the report writes into its workdir)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir, ignore=shutil.ignore_patterns("report", "eval"))
    return workdir


def _links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', page)


def _check_page(path: str) -> str:
    """Every link of the page resolves beside it and every image is a non-empty PNG."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    report_dir = os.path.dirname(path)
    links = _links(page)
    assert links, "the page links no figure"
    for link in links:
        target = os.path.join(report_dir, link)
        assert os.path.isfile(target), f"broken link {link}"
        if link.endswith(".png"):
            with open(target, "rb") as f:
                head = f.read(8)
            assert head == PNG_MAGIC and os.path.getsize(target) > 1000, link
    for png in os.listdir(report_dir):  # index.html is the completion marker: written last
        if png.endswith(".png"):
            assert os.path.getmtime(os.path.join(report_dir, png)) <= os.path.getmtime(path)
    return page


def test_report_without_bank_or_results(tiny_config, run):
    path = report_stage.make_report(tiny_config, run)
    assert path == os.path.join(run, "report", "index.html")
    assert workdir_lib.is_done("report", run)
    page = _check_page(path)
    links = _links(page)
    assert "pathway_0.png" in links and "density_hist.png" in links
    assert "class_frequency.png" not in links and "density_vs_mdc.png" not in links
    galleries = [link for link in links if link.startswith("gallery_class")]
    assert 1 <= len(galleries) <= 10
    # Without eval/results.json the table shows the generator's own test metrics, and says so.
    assert "generator/metrics.json" in page and "<td>gencnp</td>" in page


def test_report_with_bank_and_results(tiny_config, run):

    build_bank.build_bank(tiny_config, run)
    os.makedirs(os.path.join(run, "eval"))
    with open(os.path.join(run, "eval", "results.json"), "w") as f:
        json.dump(RESULTS, f)
    page = _check_page(report_stage.make_report(tiny_config, run, samples=1, per_class=1))
    links = _links(page)
    assert "class_frequency.png" in links and "density_vs_mdc.png" in links
    assert "mDC_vs_density.png" in links and "agreement_vs_density.png" in links
    assert 'id="scorecard"' in page and 'id="per_density"' in page
    assert "pathway_0.png" in links and "pathway_1.png" not in links
    assert "<table" in page and "sanity_iou" in page
    for method in RESULTS["methods"]:
        assert f"<td>{method}</td>" in page
    assert "generator/metrics.json (no eval" not in page


def test_failed_report_leaves_no_marker(tiny_config, run, monkeypatch):
    os.makedirs(os.path.join(run, "report"))
    with open(os.path.join(run, "report", "index.html"), "w") as f:
        f.write("<html>an older report</html>")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "load_classifier", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report_stage.make_report(tiny_config, run)
    assert not workdir_lib.is_done("report", run)  # an old page must not mark the stage done


def test_gradcam_site(tiny_config):
    sites = {"block1/conv1": 8, "block4/conv1": 16}
    assert report_stage.gradcam_site(tiny_config, sites) == "block4/conv1"
    config = copy.deepcopy(tiny_config)
    config.eval.gradcam_site = "block1/conv1"
    assert report_stage.gradcam_site(config, sites) == "block1/conv1"
    config.eval.gradcam_site = "block9/conv1"
    with pytest.raises(validation.ConfigError, match="gradcam_site"):
        report_stage.gradcam_site(config, sites)


def test_class_names():
    assert report_stage.class_names("fashion_mnist", 10)[9] == "Ankle boot"
    assert report_stage.class_names("cifar10", 3) == ["0", "1", "2"]


def test_select_gallery_mixes_correct_and_wrong():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 1, 0])
    chosen = report_stage.select_gallery(labels, pred, 4, per_class=2)
    assert chosen[0] == [0, 1]  # one right, one wrong
    assert chosen[1] == [3, 4]  # no wrong one: two right
    assert chosen[2] == [5]  # only one image, predicted wrong
    assert chosen[3] == []


def test_explain_split_matches_the_explainer(tiny_config, generator_workdir):
    explainer = explainer_lib.Explainer.from_workdir(generator_workdir, tiny_config)
    images = inputs.load_data(tiny_config, "test").images[:37]
    gates, pred, pathway_pred = report_stage.explain_split(explainer, images, batch_size=16)
    p = explainer(images)  # one batch, no padding
    assert list(gates) == list(explainer.classifier.site_channels)  # the classifier's order
    for site, g in gates.items():
        assert g.dtype == np.uint8 and g.shape == p.gates[site].shape
        np.testing.assert_array_equal(g, np.asarray(p.gates[site]) >= 0.5)
    np.testing.assert_array_equal(pred, np.asarray(p.explained_class))
    np.testing.assert_array_equal(pathway_pred, np.argmax(np.asarray(p.pathway_logits), -1))
