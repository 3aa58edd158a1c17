"""Classifier training: the step learns and compiles once; the stage writes its metrics,
resumes bit for bit, and rejects an unknown classifier with one clear error."""

import copy
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gencnp_jax.context import inputs, loading
from gencnp_jax.io import checkpointing, sharding
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers
from gencnp_jax.stages import pipeline, validation
from gencnp_jax.train import batchnorm
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import loop as train_loop


@pytest.fixture(scope="module")
def step_setup(tiny_config):
    """A classifier train step whose optimizer counts how often the step is traced."""
    model, _ = loading.classifier_template(tiny_config)
    base = train_classifier.make_optimizer(1e-2, 0.0, 1, 100, 1.0)
    traces = []

    def counting_update(updates, state, params=None):
        traces.append(1)  # runs at trace time only
        return base.update(updates, state, params)

    tx = optax.GradientTransformation(base.init, counting_update)
    graphdef, state = train_loop.TrainState.create(model, tx)
    step_fn = jax.jit(
        chex.assert_max_traces(train_classifier.make_train_step(graphdef, tx).__wrapped__, n=1)
    )
    train = inputs.load_data(tiny_config, "train")
    return step_fn, traces, state, train


def _batch(config, train, start, size=32):
    images = inputs.normalize(config, train.images[start : start + size])
    return {
        "images": jnp.asarray(images),
        "labels": jnp.asarray(train.labels[start : start + size]),
    }


def _fresh(state):
    return jax.tree.map(jnp.copy, state)  # the step donates its state


def test_train_steps_lower_the_loss_on_a_fixed_batch(step_setup, tiny_config):
    step_fn, _, state0, train = step_setup
    batch = _batch(tiny_config, train, 0)
    state, losses = _fresh(state0), []
    for _ in range(8):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["train/loss"]))
    chex.assert_tree_all_finite(state)
    assert losses[-1] < 0.8 * losses[0], losses
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, state0.params)
    assert all(jax.tree.leaves(changed)), "every parameter should move"


def test_train_step_compiles_once(step_setup, tiny_config):
    step_fn, traces, state0, train = step_setup
    state = _fresh(state0)
    for i in range(4):
        batch = _batch(tiny_config, train, 32 * i)
        state, metrics = step_fn(state, batch)
        assert np.isfinite(float(metrics["train/loss"]))
    # New batches reuse the one trace (shared with the test above, which ran the same step);
    # chex.assert_max_traces fails the step itself on a second trace.
    assert len(traces) == 1


def test_metrics_json(trained_workdir, tiny_config):
    out_dir = workdir_lib.classifier_dir(trained_workdir)
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    classifier = loading.load_classifier(tiny_config, trained_workdir)
    assert metrics["num_params"] == classifiers.num_params(classifier.state)
    assert metrics["site_channels"] == classifier.site_channels
    assert metrics["train_steps"] == 32  # 2 epochs of 512 examples in batches of 32
    assert metrics["num_devices"] == 1 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["random_drop10_agreement"] <= 1.0
    assert 0.0 <= metrics["random_drop10_agreement_mean_ablation"] <= 1.0
    # The synthetic classes are easy: well above chance (0.1) after 32 steps.
    assert metrics["test_accuracy"] > 0.3
    # The reported accuracy is the saved final classifier's.
    test = inputs.load_data(tiny_config, "test")
    images = jnp.asarray(inputs.normalize(tiny_config, test.images))
    predict = jax.jit(lambda state, x: classifiers.forward(classifier.graphdef, state, x)[0])
    logits = predict(classifier.state, images)
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == test.labels))
    assert abs(accuracy - metrics["test_accuracy"]) <= 1.0 / len(test.labels) + 1e-9
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(4, 33, 4))
    assert all(np.isfinite(losses))
    assert any(r.get("test/accuracy") == metrics["test_accuracy"] for r in rows)


def test_resume_gives_the_same_classifier(trained_workdir, tiny_config, tmp_path):
    """Train 32 steps (the fixture); here: keep only its step-24 checkpoint and resume."""
    workdir = str(tmp_path / "resumed")
    src, dst = workdir_lib.classifier_dir(trained_workdir), workdir_lib.classifier_dir(workdir)
    shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(dst, "checkpoints"))
    ckpt = checkpointing.Checkpointer(os.path.join(dst, "checkpoints"))
    assert ckpt.steps() == [24, 32]
    ckpt.close()
    shutil.rmtree(os.path.join(dst, "checkpoints", "32"))
    metrics = train_classifier.train_classifier(tiny_config, workdir)
    assert metrics["resumed_from_step"] == 24
    original = loading.load_classifier(tiny_config, trained_workdir)
    resumed = loading.load_classifier(tiny_config, workdir)
    chex.assert_trees_all_equal(resumed.state, original.state)


def test_unknown_classifier_is_one_clear_error(tiny_config, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config.classifier.name = "alexnet"
    with pytest.raises(validation.ConfigError, match=r"config.classifier.name='alexnet'"):
        validation.check_config(config)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.run("train_classifier", config, str(tmp_path / "run"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.classifier.name='alexnet'" in err[0], err
    assert not os.path.exists(workdir_lib.classifier_dir(str(tmp_path / "run")))
    validation.check_config(tiny_config)  # the unchanged config passes


def _bn_inputs(model, images):
    """The input of each BatchNorm of a (depth-1) VGG in inference mode, walked by hand."""
    inputs, x = [], images
    for name in model.stage_names:
        conv_bn = getattr(model, name).conv1
        h = conv_bn.conv(x)
        inputs.append((conv_bn.bn, h))
        x = jax.nn.relu(conv_bn.bn(h, use_running_average=True))
        if min(x.shape[1:3]) >= 2:
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return inputs


def test_reestimated_batchnorm_stats_are_the_population_stats_of_their_inputs():
    model = classifiers.make_classifier("vgg", (4, 8, 8), 10, 1, 1, seed=0)
    graphdef, state = nnx.split(model)
    images = np.random.default_rng(0).normal(1.0, 2.0, (40, 12, 12, 1)).astype(np.float32)
    mesh = sharding.make_mesh(1)
    old = jax.tree.map(np.array, state)
    # 40 rows in batches of 16: the last batch is padded, its padding must not count
    new = batchnorm.reestimate_batchnorm(graphdef, state, lambda idx: images[idx], 40, 16, mesh)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), old)  # input unchanged
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for bn, h in _bn_inputs(nnx.merge(graphdef, new), jnp.asarray(images)):
        h = np.asarray(h, np.float64)
        np.testing.assert_allclose(bn.mean.get_value(), h.mean((0, 1, 2)), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(bn.var.get_value(), h.var((0, 1, 2)), atol=1e-5, rtol=1e-5)
    # Params untouched; the fresh model's statistics (0 and 1) did change.
    new_params, old_params = (
        nnx.split_state(new, nnx.Param, ...)[0],
        nnx.split_state(old, nnx.Param, ...)[0],
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, new_params), old_params)
    assert not np.allclose(nnx.merge(graphdef, new).block1.conv1.bn.mean.get_value(), 0.0)


def test_randomized_classifier_has_its_own_batchnorm_stats(trained_workdir, tiny_config):
    classifier = loading.load_classifier(tiny_config, trained_workdir)
    train = inputs.load_data(tiny_config, "train")
    mesh = inputs.make_mesh(tiny_config)
    randomized = train_classifier.randomized_classifier(tiny_config, classifier, train, mesh, 7)
    stats = lambda s: jax.tree.map(np.asarray, nnx.split_state(s, nnx.BatchStat, ...)[0])
    params = lambda s: jax.tree.map(np.asarray, nnx.split_state(s, nnx.Param, ...)[0])
    trained_stats, random_stats = stats(classifier.state), stats(randomized.state)
    assert all(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(trained_stats), jax.tree.leaves(random_stats), strict=True)
    )
    assert not any(
        np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(params(classifier.state)),
            jax.tree.leaves(params(randomized.state)),
            strict=True,
        )
        if a.size > 1
    )
    again = batchnorm.reestimate_batchnorm(
        randomized.graphdef, randomized.state,
        lambda idx: inputs.normalize(tiny_config, train.images[idx]), len(train.labels), 64, mesh,
    )  # fmt: skip
    chex.assert_trees_all_close(stats(again), random_stats, atol=1e-5, rtol=1e-5)
    assert randomized.site_channels == classifier.site_channels
