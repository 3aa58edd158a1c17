"""A user's first hour with their own model, outside the repository (issue #26).

The venv that runs the suite (`bash setup.sh` makes it, the project installed into it) is the
user's: from a folder outside the repository, with PYTHONPATH unset, `import gencnp_jax`
works, `gencnp` exists beside the interpreter, the shipped configs load, and a user's model
module in the current folder is found by the console script.
"""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_launch

import gencnp_jax
from examples import fashion_cnn
from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs
from gencnp_jax.io import data, writers
from gencnp_jax.stages import build_bank, cli, pipeline, report, validation

BIN = os.path.dirname(sys.executable)
GENCNP = os.path.join(BIN, "gencnp")
SETUP_HINT = "run `bash setup.sh` (it installs the project into .venv)"


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a user outside the repository: no PYTHONPATH, CPU only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_the_project_is_installed_in_the_venv(tmp_path):
    code = "import configs.tiny, gencnp_jax; print(gencnp_jax.__file__); print(configs.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{SETUP_HINT}\n{proc.stderr[-2000:]}"
    package, configs = proc.stdout.split()
    assert package == os.path.join(ROOT, "gencnp_jax", "__init__.py"), SETUP_HINT
    assert configs == os.path.join(ROOT, "configs", "__init__.py"), SETUP_HINT
    assert os.access(GENCNP, os.X_OK), f"no {GENCNP}: {SETUP_HINT}"


# --- list-valued fields on the command line ------------------------------------------------


def test_comma_separated_lists_become_tuples():
    argv = [
        "gencnp",
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        "--config.classifier.sites=act*,relu*",  # strings
        "--config.generator.model.pooling",  # the two-word form
        "avg,max",
        "--config.eval.ablations=zero",
        "--config.classifier.widths=8,16",  # numbers: already a tuple literal
        "--config.eval.densities=0.2",
        "--config.generator.loss.ranked_density=[0.1, 0.3]",
        "--config.classifier.sites=",  # empty
        "--config.seed=3",  # not a tuple
        "--config.data.dataset=npz:a,b",
    ]
    assert cli.list_overrides(argv) == [
        argv[0],
        argv[1],
        "--config.classifier.sites=('act*', 'relu*')",
        "--config.generator.model.pooling=('avg', 'max')",
        "--config.eval.ablations=('zero',)",
        "--config.classifier.widths=8,16",
        "--config.eval.densities=(0.2,)",
        "--config.generator.loss.ranked_density=[0.1, 0.3]",
        "--config.classifier.sites=()",
        "--config.seed=3",
        "--config.data.dataset=npz:a,b",
    ]
    assert cli.list_overrides(["gencnp", "--config=/no/such.py", "--config.x=a,b"]) == [
        "gencnp", "--config=/no/such.py", "--config.x=a,b"
    ]  # fmt: skip


def test_lists_through_launch_and_a_refused_run_leaves_no_folder(tiny_config, tmp_path):
    weights = gencnp_jax.save_weights(fashion_cnn.build(), str(tmp_path / "w.npz"))
    workdir = tmp_path / "new" / "run"
    proc = run_launch(
        tiny_config,
        str(workdir),
        "all",
        "--config.classifier.factory=examples.fashion_cnn:build",
        f"--config.classifier.checkpoint={weights}",
        "--config.generator.model.pooling=avg,max",  # each checked before the sites
        "--config.eval.ablations=zero,mean",
        "--config.eval.densities=0.1,0.2",
        "--config.classifier.sites=blocks/*/layers/2,blocks/*/relu",
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: config.classifier.sites=('blocks/*/layers/2', 'blocks/*/relu'): site pattern "
            "'blocks/*/relu' matches no submodule"
        )
    ), proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "new")  # nothing created, not even the parent


# --- normalisation ------------------------------------------------------------------------


def test_normalization_forms(tiny_config):
    rgb = np.full((1, 2, 2, 3), 255, np.uint8)
    np.testing.assert_array_equal(data.normalize(rgb, "cifar10", "none"), np.ones_like(rgb))
    explicit = data.normalize(rgb, "cifar10", "0,0.5,1:1,0.5,0.25")
    np.testing.assert_allclose(explicit[0, 0, 0], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(data.normalize(rgb, "cifar10", "0.5:0.25"), np.full(rgb.shape, 2))
    stats = data.DATASET_STATS["cifar10"]
    np.testing.assert_allclose(
        data.normalize(rgb, "cifar10")[0, 0, 0], (1 - np.asarray(stats[0])) / stats[1], rtol=1e-6
    )
    config = copy.deepcopy(tiny_config)
    images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    config.data.normalization = "none"
    np.testing.assert_array_equal(inputs.normalize(config, images), images / np.float32(255))
    assert inputs.describe_normalization(config) == "x/255 (config.data.normalization='none')"
    config.data.normalization = "dataset"
    assert inputs.describe_normalization(config) == (
        "(x/255 - (0.286,)) / (0.353,) (config.data.normalization='dataset')"
    )


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.5", "config.data.normalization='0.5': write 'dataset' (the dataset's channel "
         "statistics), 'none' (x/255 in [0, 1]) or 'MEAN,...:STD,...'"),
        ("mean:std", "config.data.normalization='mean:std': write 'dataset'"),
        ("0.1,0.2:0.3", "config.data.normalization='0.1,0.2:0.3': write 'dataset'"),
        ("0.5:0", "config.data.normalization='0.5:0': every STD must be > 0"),
        ("0.1,0.2,0.3:1,1,1", "config.data.normalization='0.1,0.2,0.3:1,1,1' gives 3 values "
         "for images of 1 channels: give one value or 1"),
    ],
)  # fmt: skip
def test_bad_normalization_is_one_clear_error(tiny_config, value, message):
    config = copy.deepcopy(tiny_config)
    config.data.normalization = value
    with pytest.raises(validation.ConfigError) as info:
        validation.check_config(config)
    assert str(info.value).startswith(message), str(info.value)


# --- a refused run leaves nothing behind ---------------------------------------------------


def test_an_npz_without_labels_leaves_no_folder(tiny_config, tmp_path, capsys):
    """(A site pattern that matches nothing and weights of the wrong shape: test_user_model's
    bad-input test and `test_lists_through_launch_and_a_refused_run_leaves_no_folder`.)"""
    folder = tmp_path / "data"
    folder.mkdir()
    images = np.zeros((64, 28, 28), np.uint8)
    np.savez(folder / "train.npz", images=images)  # no labels
    np.savez(folder / "test.npz", images=images, labels=np.zeros(64, np.int64))
    config = copy.deepcopy(tiny_config)
    config.data.dataset = f"npz:{folder}"
    workdir = tmp_path / "new" / "run"
    with pytest.raises(SystemExit):
        pipeline.run("all", config, str(workdir))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: config.data.dataset='npz:{folder}': {folder}/train.npz has no 'labels' array "
        f"(it holds ['images']): write np.savez(path, images=uint8 NxHxW[xC], labels=int N[, "
        f"class_names=K str])"
    )
    assert not os.path.exists(tmp_path / "new")


# --- small data -----------------------------------------------------------------------------


def test_fields_larger_than_the_data_are_named_once(tiny_config, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    sizes = inputs.split_sizes(config)
    assert sizes == {"train": 512, "validation": 64, "test": 128}
    assert validation.small_data(config, sizes) == (
        "small data (512 training, 64 validation, 128 test images): "
        "generator.stats_examples 5000 -> 512"  # tiny.py keeps the default
    )
    config.eval.num_examples, config.eval.control_examples = 1000, 600
    config.eval.auc_examples, config.eval.reference_examples = 500, 256
    assert validation.small_data(config, sizes).endswith(
        "generator.stats_examples 5000 -> 512, eval.control_examples 600 -> 512, "
        "eval.num_examples 1000 -> 128 test / 64 validation images, eval.auc_examples 500 -> "
        "128, eval.reference_examples 256 -> 128"
    )
    config.generator.stats_examples = 100
    config.eval = copy.deepcopy(tiny_config.eval)
    assert validation.small_data(config, sizes) is None
    # Through the pipeline: one line before any work (here the stage order stops the run).
    config.generator.stats_examples = 5000
    with pytest.raises(SystemExit):
        pipeline.run("train_generator", config, str(tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("note:")] == [
        "note: small data (512 training, 64 validation, 128 test images): "
        "generator.stats_examples 5000 -> 512"
    ]
    assert err[-1].startswith("error: no trained classifier in")


def test_a_validation_split_that_leaves_too_few_training_images(tiny_config, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config.data.train_limit, config.data.validation_size = 0, 560  # of 576 images
    with pytest.raises(SystemExit):
        pipeline.run("all", config, str(tmp_path / "run"))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: config.data.validation_size=560 leaves 16 of the 576 training images to train "
        "on, fewer than config.train.batch_size=32: lower it (e.g. 57)"
    )
    assert not os.path.exists(tmp_path / "run")


# --- progress where it is long ------------------------------------------------------------


def test_long_passes_show_named_progress_bars(
    tiny_config, generator_workdir, tmp_path, monkeypatch
):
    named = []
    progress = writers.progress

    def recording(total, *args, desc="", **kwargs):
        named.append(desc)
        return progress(total, *args, desc=desc, **kwargs)

    monkeypatch.setattr(writers, "progress", recording)
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir)
    build_bank.build_bank(tiny_config, workdir)
    explainer = explainer_lib.Explainer.from_workdir(workdir, tiny_config)
    report.explain_split(explainer, inputs.load_data(tiny_config, "test").images, 64)
    assert named == ["bank: predictions", "bank: pathways", "report: pathways"]
