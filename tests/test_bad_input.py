"""Bad input ends in one clear error each: the message says what is wrong and how to fix it.

Through `pipeline.run` (and launch.py, in subprocesses) a user-fixable problem is one line
`error: ...` on stderr and exit status 1, never a traceback from inside JAX. The library API
(`Explainer`) raises ValueError before any JAX work. Also the numerical guards: a non-finite
loss stops training naming the step and the loss term; gradients are clipped by global norm.
"""

import copy
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import run_launch

from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs, loading
from gencnp_jax.io import data
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import class_bank as bank
from gencnp_jax.method import explain, losses
from gencnp_jax.models import classifiers, daq
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
from gencnp_jax.stages import build_bank, pipeline, validation
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator as train_generator


def _one_error_line(capsys) -> str:
    """The `error: ...` line of a failed `pipeline.run`: the last on stderr, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def _run_fails(capsys, mode, config, workdir) -> str:
    with pytest.raises(SystemExit) as exit_info:
        pipeline.run(mode, config, workdir)
    assert exit_info.value.code == 1
    return _one_error_line(capsys)


# --- images given to the public API ---------------------------------------------------------


@pytest.fixture(scope="module")
def explainer(tiny_config):
    """An Explainer over an untrained tiny classifier and generator (the checks come first)."""
    (h, w, c), k = data.dataset_info(tiny_config.data.dataset)
    model = loading.new_classifier(tiny_config, k, c)
    graphdef, state = classifiers.split(model)
    classifier = FrozenClassifier(graphdef, state, model.site_channels, k)
    generator = FrozenGenerator(
        *nnx.split(loading.new_generator(tiny_config, classifier.site_channels, k))
    )
    return explainer_lib.Explainer(
        generator,
        classifier,
        normalize=lambda x: data.normalize(x, tiny_config.data.dataset),
        image_shape=(h, w, c),
        settings=daq.Settings.create(2.0, 2.0),
        batch_size=tiny_config.eval.batch_size,
    )


def _images(shape, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, shape).astype(dtype)


@pytest.mark.parametrize(
    "images, message",
    [
        (
            _images((4, 32, 32)),
            r"images of shape \(4, 32, 32\): give a batch N x 28 x 28 x 1, "
            r"N x 28 x 28 \(one channel\), or one image 28 x 28 x 1 or 28 x 28$",
        ),
        (_images((28, 28, 3)), r"images of shape \(28, 28, 3\)"),
        (_images((1, 1, 28, 28, 1)), r"images of shape \(1, 1, 28, 28, 1\)"),
        (_images((4, 32, 32, 1)), r"images must be Nx28x28x1, got \(4, 32, 32, 1\)"),
        (_images((4, 28, 28, 3)), r"images must be Nx28x28x1, got \(4, 28, 28, 3\)"),
        (_images((4, 28, 28, 1), np.int32), r"dtype int32: pass uint8 pixels"),
        (_images((4, 28, 28, 1), np.int64), r"dtype int64"),
        (_images((4, 28, 28, 1), bool), r"dtype bool"),
        (np.full((4, 28, 28, 1), np.nan, np.float32), r"NaN or inf"),
        (np.full((4, 28, 28, 1), np.inf, np.float32), r"NaN or inf"),
    ],
    ids=["rank3", "rgb_image", "rank5", "size", "channels", "int32", "int64", "bool", "nan", "inf"],
)
def test_explainer_rejects_bad_images(explainer, images, message):
    with pytest.raises(ValueError, match=message):
        explainer(images)


@pytest.mark.parametrize("shape, dtype", [((4, 28, 28), np.float32), ((4, 28, 28, 1), np.uint8)])
def test_pure_explain_rejects_non_float_or_non_nhwc_even_under_jit(explainer, shape, dtype):
    fn = jax.jit(
        lambda images: explain.explain(
            explainer.generator, explainer.classifier, images, explainer.settings
        )
    )
    with pytest.raises(ValueError, match=r"images must be a float NHWC batch \(rank 4\)"):
        fn(np.zeros(shape, dtype))


def test_explainer_accepts_uint8_and_normalised_float(explainer, tiny_config):
    images = _images((4, 28, 28, 1))
    from_uint8 = explainer(images)
    from_float = explainer(data.normalize(images, tiny_config.data.dataset))
    assert from_uint8.full_logits.shape == (4, 10)
    np.testing.assert_array_equal(from_uint8.full_logits, from_float.full_logits)
    # What the datasets hold: N x H x W (one channel); one image H x W x C or H x W.
    np.testing.assert_array_equal(explainer(images[..., 0]).full_logits, from_uint8.full_logits)
    float_gray = data.normalize(images, tiny_config.data.dataset)[..., 0]
    np.testing.assert_array_equal(explainer(float_gray).full_logits, from_uint8.full_logits)
    for one in (images[2], images[2, ..., 0]):
        np.testing.assert_array_equal(explainer(one).full_logits, from_uint8.full_logits[2:3])


# --- data ----------------------------------------------------------------------------------


def _fake_split(monkeypatch, images, labels):
    split = data.ArraySplit(images, labels, 10, "train")
    monkeypatch.setattr(data, "load_split", lambda *args, **kwargs: split)


def test_labels_out_of_range(tiny_config, monkeypatch):
    _fake_split(monkeypatch, _images((8, 28, 28, 1)), np.arange(8, dtype=np.int32) + 5)
    with pytest.raises(data.DatasetError, match=r"split 'train' of 'fashion_mnist'.*\[0, 10\)"):
        inputs.load_data(tiny_config, "train")


def test_negative_labels(tiny_config, monkeypatch):
    _fake_split(monkeypatch, _images((8, 28, 28, 1)), np.arange(8, dtype=np.int32) - 1)
    with pytest.raises(data.DatasetError, match=r"got -1\.\.6"):
        inputs.load_data(tiny_config, "train")


def test_dataset_images_of_the_wrong_size(tiny_config, monkeypatch):
    _fake_split(monkeypatch, _images((8, 32, 32, 3)), np.zeros(8, np.int32))
    with pytest.raises(data.DatasetError, match=r"images are \(32, 32, 3\).*\(28, 28, 1\)"):
        inputs.load_data(tiny_config, "train")


def test_idx_labels_out_of_range(tiny_config, tmp_path, capsys):
    """Real files: an IDX label file holding 11 stops the first stage with one line."""
    import gzip

    from conftest import NUM_TRAIN, _idx_bytes, write_idx_set

    manual = tmp_path / "idx"
    manual.mkdir()
    write_idx_set(str(manual))
    with gzip.open(manual / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes((np.arange(NUM_TRAIN) % 12).astype(np.uint8)))
    config = copy.deepcopy(tiny_config)
    config.data.manual_dir, config.data.data_dir = str(manual), str(tmp_path / "tfds")
    line = _run_fails(capsys, "train_classifier", config, str(tmp_path / "run"))
    assert f"{manual}/train-labels-idx1-ubyte.gz: label 11 outside 0..9" in line, line


def test_missing_dataset_directory(tiny_config, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config.data.manual_dir = str(tmp_path / "no_such_dir")
    config.data.data_dir = str(tmp_path / "tfds")
    line = _run_fails(capsys, "train_classifier", config, str(tmp_path / "run"))
    assert line == (
        f"error: Fashion-MNIST manual dir {tmp_path}/no_such_dir does not exist: install the IDX "
        "files with `sudo apt-get install dataset-fashion-mnist`, or set "
        "--config.data.manual_dir=/path/with/idx/files"
    )


def test_empty_dataset_directory_through_launch(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = copy.deepcopy(tiny_config)
    config.data.manual_dir, config.data.data_dir = str(empty), str(tmp_path / "tfds")
    proc = run_launch(config, str(tmp_path / "run"), "train_classifier", timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert err[-1].startswith(f"error: missing IDX file {empty}/train-images-idx3-ubyte"), err
    assert "apt-get install dataset-fashion-mnist" in err[-1]


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval.gradcam_site", "block9/conv1", "config.eval.gradcam_site='block9/conv1' is not a "
         "gate site of this classifier: choose one of ['block1/conv1', 'block2/conv1', "
         "'block3/conv1', 'block4/conv1'] (or '' for the last)"),
        ("classifier.name", "alexnet", "config.classifier.name='alexnet' is unknown: choose one "
         "of ('vgg', 'resnet')"),
        ("data.dataset", "imagenet_typo", "config.data.dataset='imagenet_typo' cannot be used "
         "(unknown TFDS dataset 'imagenet_typo'): choose fashion_mnist, mnist, cifar10 or "
         "another TFDS dataset prepared in config.data.data_dir"),
        ("generator.model.cell", "rnn",
         "config.generator.model.cell='rnn': choose one of ('gru', 'lstm', 'mlp')"),
        ("generator.model.pooling", ("avg", "median"),
         "config.generator.model.pooling=('avg', 'median'): choose one or more of ('avg', 'max')"),
        ("train.log_every", 0, "config.train.log_every=0 must be a positive int"),
        ("generator.steps", -5, "config.generator.steps=-5 must be a positive int"),
        ("bank.threshold", 1.5, "config.bank.threshold=1.5 must be in [0, 1]"),
        ("num_devices", 64, "config.num_devices=64 but"),
        ("data.train_limit", 16, "config.data.train_limit=16 leaves -48 training images beside "
         "config.data.validation_size=64, fewer than config.train.batch_size=32"),
        ("data.validation_size", -1, "config.data.validation_size=-1 must be an int >= 0"),
        ("eval.densities", (0.1, 1.0), "config.eval.densities=(0.1, 1.0) must lie in (0, 1)"),
        ("eval.ablations", ("mean", "half"), "config.eval.ablations=('mean', 'half'): choose one "
         "or both of ('mean', 'zero')"),
        ("generator.loss.w_ranked", -1.0, "config.generator.loss.w_ranked=-1.0 must be >= 0"),
        ("generator.loss.w_rank", -2.0, "config.generator.loss.w_rank=-2.0 must be >= 0"),
        ("generator.loss.ranked_density", (0.3, 0.1), "config.generator.loss.ranked_density="
         "(0.3, 0.1) must be (low, high) with 0 < low <= high < 1"),
        ("eval.reference_examples", 0, "config.eval.reference_examples=0 must be an int >= 1"),
        ("eval.reference_steps", -1, "config.eval.reference_steps=-1 must be an int >= 0"),
    ],
)  # fmt: skip
def test_bad_config_is_one_clear_error(tiny_config, tmp_path, capsys, field, value, message):
    config = copy.deepcopy(tiny_config)
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(validation.ConfigError) as info:
        validation.check_config(config)
    assert str(info.value).startswith(message), str(info.value)
    workdir = str(tmp_path / "run")
    assert _run_fails(capsys, "train_classifier", config, workdir) == f"error: {info.value}"
    assert not os.path.exists(workdir_lib.classifier_dir(workdir))  # failed before any work


def test_known_gate_site_passes(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.eval.gradcam_site = "block2/conv1"
    validation.check_config(config)


def test_batch_that_does_not_split_over_the_devices(tiny_config, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    with pytest.raises(validation.ConfigError, match=r"config.train.batch_size=32 does not "
                       r"split over 3 devices: choose a multiple of 3"):  # fmt: skip
        validation.check_config(tiny_config)


def test_unknown_classifier_through_launch(tiny_config, tmp_path):
    proc = run_launch(
        tiny_config, str(tmp_path / "run"), "all", "--config.classifier.name=alexnet", timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.classifier.name='alexnet' is unknown: choose one of ('vgg', 'resnet')"
    )


# --- workdir and stage order -----------------------------------------------------------------


def test_workdir_that_is_not_writable_through_launch(tiny_config, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    workdir = str(blocker / "sub")  # root can write anywhere, but not under a regular file
    proc = run_launch(tiny_config, workdir, "train_classifier", timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: workdir {workdir} is not writable (Not a directory): choose another --workdir "
        "or fix its permissions"
    )


def test_train_generator_without_a_classifier(tiny_config, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    line = _run_fails(capsys, "train_generator", tiny_config, workdir)
    assert line == (
        f"error: no trained classifier in {workdir}/classifier: run `python launch.py "
        f"--config=... --workdir={workdir} --mode=train_classifier` first"
    )
    assert not os.path.exists(workdir)  # refused before anything is written


def test_later_stages_without_their_inputs(tiny_config, trained_workdir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(
        workdir_lib.classifier_dir(trained_workdir), workdir_lib.classifier_dir(workdir)
    )
    for mode in ("build_bank", "evaluate"):
        line = _run_fails(capsys, mode, tiny_config, workdir)
        assert line.startswith(f"error: no trained generator in {workdir}/generator: run"), line
        assert "--mode=train_generator` first" in line


def test_bank_of_another_classifier(tiny_config, generator_workdir, tmp_path, capsys):
    """A bank copied in from another run: evaluate stops with one line saying to rebuild it."""
    workdir = str(tmp_path / "run")
    for stage in ("classifier", "generator"):
        shutil.copytree(os.path.join(generator_workdir, stage), os.path.join(workdir, stage))
    own = loading.load_classifier(tiny_config, workdir)
    other_state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               own.state)  # fmt: skip
    k, sites = own.num_classes, own.site_channels
    ones = {s: jnp.ones((k, c), jnp.float32) for s, c in sites.items()}
    b = tiny_config.bank
    foreign = bank.ClassBank(
        ones, ones, jnp.ones((k,), jnp.int32), b.samples_per_class, b.threshold, b.class_source,
        build_bank.fingerprint(other_state, sites),
    )  # fmt: skip
    build_bank.save_bank(foreign, workdir, list(sites))
    line = _run_fails(capsys, "evaluate", tiny_config, workdir)
    assert line.startswith(
        f"error: the class-pathway bank in {workdir}/bank was built for another classifier or "
        "config (classifier fingerprint "
    ), line
    assert line.endswith(f"--workdir={workdir} --mode=build_bank`"), line


# --- numerical guards ------------------------------------------------------------------------


def test_diverging_classifier_stops_naming_the_step_and_loss(tiny_config, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config.classifier.learning_rate = 1e30
    workdir = str(tmp_path / "run")
    line = _run_fails(capsys, "train_classifier", config, workdir)
    assert line.startswith("error: non-finite train/loss at step 4"), line
    assert "lower this stage's learning_rate" in line
    ckpt_dir = os.path.join(workdir_lib.classifier_dir(workdir), "checkpoints")
    assert not [s for s in os.listdir(ckpt_dir) if s.isdigit()]  # nothing diverged was saved


def test_non_finite_loss_term_is_named(tiny_config, trained_workdir, tmp_path, monkeypatch):
    """Only the PDN term is NaN (a constant: the gradients stay finite): the error names it
    and the total, no other term, and the step it was seen at."""
    workdir = str(tmp_path / "run")
    shutil.copytree(
        workdir_lib.classifier_dir(trained_workdir), workdir_lib.classifier_dir(workdir)
    )
    monkeypatch.setattr(losses, "pdn_kl", lambda *args: jax.lax.stop_gradient(jnp.float32(jnp.nan)))
    with pytest.raises(FloatingPointError) as info:
        train_generator.train_generator(tiny_config, workdir)
    message = str(info.value)
    assert message.startswith("non-finite loss/pdn, loss/total at step 4:"), message
    assert "sparsity" not in message and "other non-finite" not in message
    ckpt_dir = os.path.join(workdir_lib.generator_dir(workdir), "checkpoints")
    assert not [s for s in os.listdir(ckpt_dir) if s.isdigit()]


def test_check_finite_names_terms_first():
    values = {"loss/total": jnp.nan, "loss/kd": 1.0, "loss/leak": jnp.inf, "train/density": jnp.nan}
    with pytest.raises(FloatingPointError) as info:
        train_classifier.check_finite(12, values)
    assert str(info.value).startswith(
        "non-finite loss/leak, loss/total at step 12 (and 1 other non-finite metrics)"
    )
    assert train_classifier.check_finite(3, {"loss/kd": jnp.float32(0.5)}) == {"loss/kd": 0.5}


def test_gradients_are_clipped_by_global_norm():
    params = {"w": jnp.zeros(4), "b": jnp.zeros(2)}
    grads = {"w": jnp.array([30.0, -40.0, 0.0, 0.0]), "b": jnp.array([1e-3, 0.0])}  # norm ~50
    clip = 1e-8  # clipped entries fall to Adam's eps: the update shrinks with them
    tx = train_classifier.make_optimizer(0.1, 0.0, 0, 10, clip)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = optax.global_norm(grads)
    clipped = jax.tree.map(lambda g: g * clip / norm, grads)
    reference = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, 10), weight_decay=0.0)
    expected, _ = reference.update(clipped, reference.init(params), params)
    unclipped, _ = reference.update(grads, reference.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, expected)
    assert not np.allclose(updates["w"], unclipped["w"])


@pytest.mark.parametrize("stage", ["classifier", "generator"])
def test_trainers_pass_the_configured_clip(stage, tiny_config, tmp_path, monkeypatch):
    config = copy.deepcopy(tiny_config)
    config.train.grad_clip = 0.123  # one field, read by both trainers
    seen = []

    class Stop(Exception):
        pass

    def spy(lr, weight_decay, warmup, total, clip):
        seen.append(clip)
        raise Stop

    monkeypatch.setattr(train_classifier, "make_optimizer", spy)
    if stage == "classifier":
        with pytest.raises(Stop):
            train_classifier.train_classifier(config, str(tmp_path))
    else:
        model = classifiers.make_classifier("vgg", (4, 8), 10, 1, seed=0)
        graphdef, state = classifiers.split(model)
        classifier = FrozenClassifier(graphdef, state, model.site_channels, 10)
        with pytest.raises(Stop):
            train_generator.init_state(config, classifier)
    assert seen == [0.123]
