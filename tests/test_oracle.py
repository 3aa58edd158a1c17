"""Tests for eval/oracle.py (fixed-density optima) and the headroom stage.

The toy model: logits = (mask * a) @ W with one evidence channel per image that alone carries
its class. A class mask can keep one channel per class only, so where two images of a class
use different channels the instance optimum is faithful and the class optimum is not.
"""

import copy
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.eval import oracle
from gencnp_jax.tools import headroom

N, K = 8, 2
# image i's evidence channel; images 0, 1 are class 0 (channels 0 and 1), images 2, 3 class 1
EVIDENCE = np.array([0, 1, 4, 5])
CLASSES = np.array([0, 0, 1, 1])


def _toy():
    a_BxN = np.full((4, N), 0.0, np.float32)
    a_BxN[np.arange(4), EVIDENCE] = 1.0
    w_NxK = np.zeros((N, K), np.float32)
    w_NxK[[0, 1], 0] = w_NxK[[4, 5], 1] = 6.0
    logits_fn = lambda masks_BxN: (masks_BxN * a_BxN) @ w_NxK
    return logits_fn, logits_fn(jnp.ones((4, N)))


def _optimise(theta, expand, steps):
    logits_fn, full = _toy()
    settings = oracle.OracleSettings(
        steps=jnp.int32(steps), learning_rate=jnp.float32(0.1), rel_temperature=jnp.float32(1.0)
    )
    return oracle.optimise_ranking(logits_fn, full, theta, expand, 1 / N, settings)


def test_no_steps_returns_the_start():
    theta = jax.random.normal(jax.random.key(0), (4, N))
    best, start, best_loss = _optimise(theta, lambda t: t, 0)
    chex.assert_trees_all_close(best, theta)
    chex.assert_trees_all_close(start, best_loss)


def test_instance_optimum_finds_each_images_evidence():
    theta = np.zeros((4, N), np.float32)
    theta[np.arange(4), EVIDENCE] = -1.0  # the evidence starts last
    best, start, best_loss = _optimise(jnp.asarray(theta), lambda t: t, 100)
    np.testing.assert_array_equal(np.argmax(best, -1), EVIDENCE)
    assert float(best_loss) < 0.01 < float(start)


def test_class_optimum_shares_one_mask_per_class_and_cannot_fit_both_images():
    onehot = jnp.asarray(np.eye(K, dtype=np.float32)[CLASSES])
    theta_KxN = -jnp.ones((K, N)).at[:, 2].set(0.0)  # start on a channel no image uses
    best, start, best_loss = _optimise(theta_KxN, lambda t: onehot @ t, 100)
    chex.assert_shape(best, (K, N))
    assert float(best_loss) < float(start)
    # the best class mask keeps one of its class's two channels: half the images lose theirs
    kept = np.argmax(best, -1)
    assert kept[0] in (0, 1) and kept[1] in (4, 5)
    instance = _optimise(jnp.asarray(np.asarray(best)[CLASSES]), lambda t: t, 100)[2]
    assert float(instance) < 0.01 < float(best_loss)


def test_standardise_rows():
    x = jnp.asarray([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    z = oracle.standardise_rows(x)
    chex.assert_trees_all_close(z.mean(-1), jnp.zeros(2), atol=1e-6)
    chex.assert_trees_all_close(z.std(-1), jnp.ones(2), atol=1e-4)
    np.testing.assert_array_equal(np.argsort(z, -1), np.argsort(x, -1))


@pytest.fixture(name="headroom_result")
def fixture_headroom_result(tiny_config, generator_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir)
    config = copy.deepcopy(tiny_config)
    config.headroom.num_examples = 32
    config.eval.densities = (0.2, 0.4)
    config.headroom.steps = 15
    return workdir, headroom.headroom(config, workdir)


def test_headroom_stage_writes_both_optima_and_their_gain(headroom_result):
    workdir, result = headroom_result
    with open(os.path.join(workdir, "eval", "headroom.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert os.path.exists(os.path.join(workdir, "eval", "headroom.md"))
    assert result["num_examples"] == 32 and set(result["at_density"]) == {"0.2", "0.4"}
    for row in result["at_density"].values():
        named = {"headroom_gain", "gencnp_gain", "class_optimum_start"}
        assert set(row) == {*headroom.ROWS, *named, "best_class_mask", "best_instance_mask"}
        assert row["class_optimum_start"] in ("gencnp_class_means", "instance_optimum_class_means")
        # each optimum starts where the one before it ends and keeps its best: never worse
        assert row["class_optimum"]["kl"] <= row["class_constant"]["kl"] + 1e-4
        assert row["instance_optimum"]["kl"] <= row["class_optimum"]["kl"] + 1e-4
        assert row["instance_optimum_from_gencnp"]["kl"] <= row["gencnp"]["kl"] + 1e-4
        # the gain divides the lowest mDC of a class mask by the lowest of an instance mask
        best_class = min(row[name]["mDC"] for name in ("class_constant", "class_optimum"))
        best_instance = min(
            row[name]["mDC"]
            for name in ("gencnp", "instance_optimum", "instance_optimum_from_gencnp")
        )
        assert row[row["best_class_mask"]]["mDC"] == best_class
        assert row[row["best_instance_mask"]]["mDC"] == best_instance
        np.testing.assert_allclose(row["headroom_gain"], best_class / best_instance)
        for name in headroom.ROWS:
            assert 0.0 <= row[name]["agreement"] <= 1.0 and row[name]["mDC"] >= 0.0


def test_headroom_without_steps_scores_the_starts_and_claims_no_gain(
    tiny_config, generator_workdir, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir)
    config = copy.deepcopy(tiny_config)
    config.headroom.num_examples, config.eval.densities = 16, (0.3,)
    config.headroom.steps = 0
    row = headroom.headroom(config, workdir)["at_density"]["0.3"]
    assert row["headroom_gain"] is None
    assert row["instance_optimum_from_gencnp"] == row["gencnp"]  # the optima are their starts
    assert row["instance_optimum"] == row["class_optimum"]
    with open(os.path.join(workdir, "eval", "headroom.md")) as f:
        assert "| headroom_gain | n/a |" in f.read()
