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
from conftest import synthetic_images
from helpers import ROOT, assert_ok, launch_env, run_launch

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
    """The environment of a user outside the repository: no PYTHONPATH, CPU only (and the
    suite's XLA cache)."""
    env = {k: v for k, v in launch_env(**extra).items() if k != "PYTHONPATH"}
    return env


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


# --- the first hour, end to end, outside the repository --------------------------------------

USER_MODEL = """
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, num_classes, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
        self.act1 = nnx.relu
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.act2 = nnx.relu
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(jnp.mean(x, axis=(1, 2)))


def build(num_classes=10, seed=0):
    return Net(num_classes, nnx.Rngs(seed))
"""

USER_PREPARE = """
import gencnp_jax
import mymodel

gencnp_jax.save_weights(mymodel.build(seed=1), "weights.npz")
"""

USER_EXPLAIN = """
import numpy as np

import gencnp_jax
import mymodel

model = gencnp_jax.load_weights(mymodel.build(seed=2), "weights.npz")  # seed 1's weights
images = np.load("data/test.npz")["images"][:5]  # uint8 N x H x W
pathway = gencnp_jax.Explainer.from_workdir("run")(images)
own = model(images[..., None] / np.float32(255))  # the model's own scale: x / 255
np.testing.assert_allclose(pathway.full_logits, own, rtol=1e-5, atol=1e-5)
print("explained", pathway.full_logits.shape, sorted(pathway.gates))
"""


@pytest.mark.slow  # two gencnp runs and a script: about 60 s on two busy cores
def test_a_users_first_hour_outside_the_repository(tiny_config, tmp_path):
    """A folder outside the repository: the user's model module, weights and npz data; the
    `gencnp` command with the shipped tiny config, list-valued sites and pixels in [0, 1];
    then `load_weights` and `Explainer.from_workdir` on N x H x W uint8 images."""
    assert os.access(GENCNP, os.X_OK), f"no {GENCNP}: {SETUP_HINT}"
    home = tmp_path / "project"
    (home / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 576), ("test", 128)):
        labels = rng.permutation(np.arange(n) % 10)
        np.savez(home / "data" / f"{split}.npz", images=synthetic_images(labels, rng),
                 labels=labels)  # fmt: skip
    for name, text in (("mymodel", USER_MODEL), ("prepare", USER_PREPARE)):
        (home / f"{name}.py").write_text(text)
    (home / "explain.py").write_text(USER_EXPLAIN)

    def run(*command: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            command, cwd=home, env=outside_env(), capture_output=True, text=True, timeout=400
        )
        assert_ok(proc)
        return proc

    run(sys.executable, "prepare.py")
    flags = (
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir=run",
        "--config.data.dataset=npz:data",
        "--config.data.normalization=none",
        "--config.classifier.factory=mymodel:build",
        "--config.classifier.checkpoint=weights.npz",
        "--config.classifier.sites=act1,act2",
        "--config.cpu_devices=1",
        "--config.generator.steps=4",
        "--config.generator.loss.w_distill=0",
    )
    imported = run(GENCNP, *flags, "--mode=train_classifier")
    assert "imported mymodel:build" in imported.stdout, imported.stdout
    assert "with inputs x/255 (config.data.normalization='none')" in imported.stdout
    assert "note: small data (512 training, 64 validation, 128 test images): " in imported.stderr
    run(GENCNP, *flags, "--mode=train_generator")
    explained = run(sys.executable, "explain.py")
    assert "explained (5, 10) ['act1', 'act2']" in explained.stdout
