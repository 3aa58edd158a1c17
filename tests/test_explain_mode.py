"""The Explainer on many images (fixed-size padded batches), `--mode=explain` and the CLI.

Uses the session's tiny trained run (`generator_workdir`, conftest.py), copied so that the
explain mode's outputs and saved config never touch it.
"""

import copy
import os
import shutil
import subprocess
import sys
import tomllib

import chex
import jax
import numpy as np
import pytest

from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs, record
from gencnp_jax.method.explain import jit_explain
from gencnp_jax.method.pathway import Pathway
from gencnp_jax.stages import explain_images, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 5


def _host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def explainer(tiny_config, generator_workdir):
    return explainer_lib.Explainer.from_workdir(generator_workdir, tiny_config)


@pytest.fixture(scope="module")
def explain_run(tiny_config, generator_workdir, tmp_path_factory):
    """`--mode=explain` on the first test images, given as an npz, in a copy of the run."""
    workdir = str(tmp_path_factory.mktemp("explain_run") / "run")
    shutil.copytree(generator_workdir, workdir)
    npz = os.path.join(workdir, "images.npz")
    np.savez(npz, images=inputs.load_data(tiny_config, "test").images[:NUM_IMAGES])
    config = copy.deepcopy(tiny_config)
    config.explain.images = f"npz:{npz}"
    summary = pipeline.run("explain", config, workdir)
    return workdir, config, summary


def test_batches_match_one_batch_and_compile_once(explainer, tiny_config):
    images = inputs.load_data(tiny_config, "test").images[:37]
    one = _host(explainer(images, batch_size=37))  # every image in one call
    batched = _host(explainer(images, batch_size=16))  # 16 + 16 + 5 padded to 16
    compiled = jit_explain._cache_size()
    assert list(batched.gates) == list(explainer.classifier.site_channels)
    chex.assert_shape(batched.full_logits, (37, 10))
    chex.assert_trees_all_equal(batched.gates, one.gates)
    np.testing.assert_array_equal(batched.explained_class, one.explained_class)
    # Scores and logits agree to float32 rounding only: XLA:CPU picks its dot kernels by
    # shape, so a batch of 37 and one of 16 may round a score differently (seen: 1 ulp).
    chex.assert_trees_all_close(batched, one, rtol=1e-6, atol=1e-6)
    # Exactly equal at the same batch size, whatever the rows around them or the padding.
    for rows in (slice(0, 20), slice(16, 32), slice(32, 37)):
        part = _host(explainer(images[rows], batch_size=16))
        chex.assert_trees_all_equal(part, batched.take(rows))
    explainer(images[:3])  # config.eval.batch_size (32): one padded batch
    assert jit_explain._cache_size() == compiled + 1  # per batch size, not per length


def test_from_workdir_reads_the_saved_config(explain_run, explainer):
    workdir, config, _ = explain_run
    loaded = explainer_lib.Explainer.from_workdir(workdir)
    recorded = record.saved_config(workdir)
    assert recorded.to_dict() == config.to_dict()  # lists back to tuples
    assert recorded.generator.model.pooling == ("avg", "max")
    images = inputs.load_data(config, "test").images[:4]
    chex.assert_trees_all_equal(_host(loaded(images)), _host(explainer(images)))


def test_from_workdir_without_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config given and no .*config\.json"):
        explainer_lib.Explainer.from_workdir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json does not parse"):
        explainer_lib.Explainer.from_workdir(tmp_path)


def test_explain_mode_writes_pathways_figures_and_page(explain_run, explainer):
    workdir, config, summary = explain_run
    folder = os.path.join(workdir, "explain")
    assert summary["out_dir"] == folder and summary["num_images"] == NUM_IMAGES
    with np.load(os.path.join(folder, "pathways.npz")) as saved:
        sites = explainer.classifier.site_channels
        assert list(saved["sites"]) == list(sites)
        for site, c in sites.items():
            chex.assert_shape([saved[f"gates/{site}"], saved[f"scores/{site}"]], (NUM_IMAGES, c))
        chex.assert_shape([saved["full_logits"], saved["pathway_logits"]], (NUM_IMAGES, 10))
        chex.assert_shape([saved["explained_class"], saved["density"]], (NUM_IMAGES,))
        assert list(saved["names"]) == [f"#{i}" for i in range(NUM_IMAGES)]
        density = saved["density"]
    images = inputs.load_data(config, "test").images[:NUM_IMAGES]
    expected = _host(explainer(images))
    chex.assert_trees_all_equal(_host(Pathway.load(os.path.join(folder, "pathways.npz"))), expected)
    np.testing.assert_allclose(density, np.asarray(expected.density()))
    pngs = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    assert pngs == [f"explain_{i:04d}.png" for i in range(NUM_IMAGES)]
    for png in pngs:
        with open(os.path.join(folder, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(folder, "explain.html"), encoding="utf-8") as f:
        page = f.read()
    for i, png in enumerate(pngs):
        assert page.count(f'"{png}"') == 2, png  # the table's link and the figure
        assert f"#{i}" in page
    assert "keeps prediction" in page and f"{density[0]:.3f}" in page
    assert not [n for n in os.listdir(folder) if ".tmp" in n]


def test_explain_mode_default_images_are_the_first_test_images(tiny_config):
    images, names = explain_images.load_images(tiny_config)
    n = explain_images.TEST_IMAGES
    np.testing.assert_array_equal(images, inputs.load_data(tiny_config, "test").images[:n])
    assert names == [f"test #{i}" for i in range(n)]


def test_explain_mode_refuses_wrong_size_images(tiny_config, tmp_path, capsys):
    npz = str(tmp_path / "rgb.npz")
    np.savez(npz, images=np.zeros((2, 32, 32, 3), np.uint8))
    config = copy.deepcopy(tiny_config)
    config.explain.images = f"npz:{npz}"
    workdir = tmp_path / "run"  # no trained run needed: the images are checked first
    with pytest.raises(SystemExit) as exit_info:
        pipeline.run("explain", config, str(workdir))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    assert err[-1] == (
        f"error: config.explain.images='npz:{npz}': the images are 32x32x3 (HxWxC), the "
        f"classifier takes 28x28x1: give images of that size and number of channels"
    )
    assert not os.path.exists(workdir)  # refused before anything is written


@pytest.mark.parametrize("entry", [["-m", "gencnp_jax.stages.cli"], ["launch.py"]])
def test_command_line_help(entry):
    proc = subprocess.run(
        [sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and not proc.stderr, proc.stderr  # absl's --help exits with 1
    for flag in ("--config", "--workdir", "--mode", "--coordinator_address", "--process_id"):
        assert flag in proc.stdout, flag
    assert "|explain|all>" in "".join(proc.stdout.split())  # the help wraps long lines
    assert "default: 'configs/default.py'" in proc.stdout


def test_console_script_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    module, fn = project["scripts"]["gencnp"].split(":")
    assert (module, fn) == ("gencnp_jax.stages.cli", "main")
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = sorted(line.strip() for line in f if line.strip() and line[0] != "#")
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert sorted(declared) == required
