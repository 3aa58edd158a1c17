"""Bring your own model: a classifier defined outside gencnp_jax, built by a factory, its
weights from a checkpoint, gated by `attach`, explained by every stage.

The examples' NNX CNN goes through launch.py --mode=all (its report page included); a token
model (rank-3 activations) and a Linen CNN go through the stages one by one.
"""

import copy
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import user_models
from helpers import assert_ok, optimised_xla_flags, run_launch

import gencnp_jax
from examples import fashion_cnn
from gencnp_jax.context import inputs, loading
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers
from gencnp_jax.stages import pipeline, validation
from gencnp_jax.train import generator as train_generator

SITES = {
    "examples.fashion_cnn:build": ("blocks/*/layers/2",),
    "user_models:mixer": ("blocks/*/mlp/act",),
    "user_models:linen_cnn": ("BatchNorm_0", "Conv_1"),
}


def user_config(tiny_config, factory: str, checkpoint: str):
    config = copy.deepcopy(tiny_config)
    config.classifier.factory = factory
    config.classifier.checkpoint = checkpoint
    config.classifier.sites = SITES[factory]
    return config


def own_logits(factory: str, checkpoint: str, images):
    """The user's model run as the user runs it (eval mode), with the checkpoint's weights."""
    if factory.endswith("linen_cnn"):
        module, variables = user_models.linen_cnn()
        return module.apply(gencnp_jax.load_weights(variables, checkpoint), images)
    model = fashion_cnn.build() if factory.startswith("examples") else user_models.mixer()
    assert gencnp_jax.load_weights(model, checkpoint) is model  # filled in place
    model.eval()
    return model(images)


@pytest.fixture(scope="module")
def test_images(tiny_config):
    split = inputs.load_data(tiny_config, "test")
    return jnp.asarray(inputs.normalize(tiny_config, split.images[:16]))


@pytest.fixture(scope="module")
def trained_cnn(tiny_config, tmp_path_factory) -> str:
    """The examples' CNN trained briefly on the tiny training split, saved as a user would."""
    train = inputs.load_data(tiny_config, "train")
    model = fashion_cnn.train(
        fashion_cnn.build(), inputs.normalize(tiny_config, train.images), train.labels, 40, 32
    )
    return gencnp_jax.save_weights(model, str(tmp_path_factory.mktemp("cnn") / "weights.npz"))


def test_user_cnn_explained_end_to_end_through_launch(
    tiny_config, trained_cnn, test_images, tmp_path
):
    workdir = str(tmp_path / "run")
    overrides = (
        "--config.classifier.factory=examples.fashion_cnn:build",
        f"--config.classifier.checkpoint={trained_cnn}",
        "--config.classifier.sites=('blocks/*/layers/2',)",
    )
    proc = run_launch(
        tiny_config, workdir, "all", *overrides, timeout=600, XLA_FLAGS=optimised_xla_flags()
    )
    assert_ok(proc)
    assert "imported examples.fashion_cnn:build" in proc.stdout
    for mode in pipeline.modes.PIPELINE:
        assert workdir_lib.is_done(mode, workdir), mode  # report page and its PNGs included
    metrics = json.load(open(os.path.join(workdir_lib.classifier_dir(workdir), "metrics.json")))
    assert metrics["imported_from"] == trained_cnn and metrics["train_steps"] == 0
    assert metrics["test_accuracy"] > 0.3  # it learnt the synthetic squares
    # The workdir's copy is the user's model, bit for bit: all-ones gates change nothing.
    config = user_config(tiny_config, "examples.fashion_cnn:build", trained_cnn)
    cls = loading.load_classifier(config, workdir)
    assert list(cls.site_channels.items()) == [
        ("blocks/0/layers/2", 16), ("blocks/1/layers/2", 32), ("blocks/2/layers/2", 64)
    ]  # fmt: skip
    ones = {s: jnp.ones((16, c)) for s, c in cls.site_channels.items()}
    logits, feats = classifiers.forward(cls.graphdef, cls.state, test_images, ones)
    chex.assert_trees_all_equal(
        logits, own_logits(config.classifier.factory, trained_cnn, test_images)
    )
    chex.assert_shape(feats["blocks/1/layers/2"], (16, 14, 14, 32))
    results = json.load(open(os.path.join(workdir, "eval", "results.json")))
    assert np.isfinite(results["methods"]["gencnp"]["agreement"])
    page = open(os.path.join(workdir, "report", "index.html")).read()
    assert "blocks/2/layers/2" in page


@pytest.mark.parametrize("factory", ["user_models:mixer", "user_models:linen_cnn"])
def test_token_and_linen_models_through_the_stages(tiny_config, test_images, tmp_path, factory):
    built = getattr(user_models, factory.split(":")[1])()
    checkpoint = gencnp_jax.save_weights(built[1] if isinstance(built, tuple) else built,
                                         str(tmp_path / "weights.msgpack"))  # fmt: skip
    config = user_config(tiny_config, factory, checkpoint)
    workdir = str(tmp_path / "run")
    pipeline.run("train_classifier", config, workdir)
    cls = loading.load_classifier(config, workdir)
    ones = {s: jnp.ones((16, c)) for s, c in cls.site_channels.items()}
    logits, feats = jax.jit(lambda s, x, g: classifiers.forward(cls.graphdef, s, x, g))(
        cls.state, test_images, ones
    )
    chex.assert_trees_all_close(logits, own_logits(factory, checkpoint, test_images), atol=1e-6)
    if factory.endswith("mixer"):
        chex.assert_shape(feats["blocks/1/mlp/act"], (16, 16, 32))  # tokens: (B, N, D)
    # A fresh generator on a fixed batch: a few steps lower its loss.
    config.generator.loss.sparsity_ramp_steps = 0
    gen_graphdef, tx, state = train_generator.init_state(config, cls)
    hp, weights = train_generator.hparams_from_config(config.generator)
    step = train_generator.make_train_step(gen_graphdef, tx, weights.active())
    totals = []
    for i in range(6):
        state, out = step(state, test_images, jnp.int32(i), cls, weights, hp)
        totals.append(float(out["loss/total"]))
    assert totals[-1] < totals[0], totals
    for mode in ("train_generator", "build_bank", "evaluate", "report"):
        pipeline.run(mode, config, workdir)
    assert workdir_lib.is_done("report", workdir)  # Grad-CAM on the mixer's 4x4 token grid
    results = json.load(open(os.path.join(workdir, "eval", "results.json")))
    assert set(results["site_density"]["gencnp"]) == set(cls.site_channels)
    assert np.isfinite(results["methods"]["gencnp"]["agreement"])


# --- bad input: one clear line, nothing written -------------------------------------------


@pytest.fixture(scope="module")
def cnn_weights(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    return {
        "ok": gencnp_jax.save_weights(fashion_cnn.build(), str(folder / "ok.npz")),
        "rgb": gencnp_jax.save_weights(fashion_cnn.build(in_channels=3), str(folder / "rgb.npz")),
        "five": gencnp_jax.save_weights(fashion_cnn.build(5), str(folder / "five.npz")),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sites": ("blocks/*/relu",)}, "config.classifier.sites=('blocks/*/relu',): site "
         "pattern 'blocks/*/relu' matches no submodule; available: ['blocks/0', "
         "'blocks/0/layers/0', 'blocks/0/layers/1', 'blocks/0/layers/2', 'blocks/1',"),
        ({"factory": "examples.no_such_module:build"}, "config.classifier.factory="
         "'examples.no_such_module:build': module 'examples.no_such_module' does not import "
         "(ModuleNotFoundError: No module named 'examples.no_such_module'); it must be "
         "importable from the current directory or PYTHONPATH"),
        ({"factory": "examples.fashion_cnn:bulid"}, "config.classifier.factory="
         "'examples.fashion_cnn:bulid': module 'examples.fashion_cnn' has no function 'bulid'"),
        ({"factory": "examples.fashion_cnn"}, "config.classifier.factory="
         "'examples.fashion_cnn': write it as 'package.module:function'"),
        ({"factory": "user_models:not_a_model"}, "config.classifier.factory="
         "'user_models:not_a_model' returned str: return a Flax NNX module, or a Linen "
         "(module, variables) pair"),
        ({"checkpoint": "rgb"}, "classifier checkpoint {rgb}: 'blocks/0/layers/0/kernel' has "
         "shape (3, 3, 3, 16), the model's is (3, 3, 1, 16)"),
        ({"checkpoint": "five", "factory_kwargs": 5}, "the model of config.classifier.factory="
         "'examples.fashion_cnn:build' returns logits of shape (1, 5) for one image; the "
         "dataset has 10 classes: expected (1, 10)"),
        ({"checkpoint": "/nowhere/weights.npz"}, "classifier checkpoint /nowhere/weights.npz "
         "does not exist"),
        ({"checkpoint": ""}, "config.classifier.factory='examples.fashion_cnn:build' needs "
         "config.classifier.checkpoint"),
        ({"sites": ()}, "config.classifier.sites is empty: name the modules to explain"),
    ],
)  # fmt: skip
def test_bad_user_model_is_one_clear_error(
    tiny_config, cnn_weights, tmp_path, capsys, change, message
):
    config = user_config(tiny_config, "examples.fashion_cnn:build", cnn_weights["ok"])
    for field, value in change.items():
        if field == "factory_kwargs":
            config.classifier.factory_kwargs.num_classes = value
        elif field == "checkpoint":
            config.classifier.checkpoint = cnn_weights.get(value, value)
        else:
            config.classifier[field] = value
    message = message.format(**cnn_weights)
    with pytest.raises(validation.ConfigError) as info:
        validation.check_config(config)
    assert str(info.value).startswith(message), str(info.value)
    workdir = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        pipeline.run("all", config, workdir)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {info.value}" and not any("Traceback" in e for e in err)
    assert not os.path.exists(workdir)  # refused before any work: nothing left behind
