"""Tests for eval/oracle.py (fixed-density mask search) and the headroom tool.

The toy model: logits = (mask * a) @ W with one evidence channel per image that alone carries
its class. A class mask can keep one channel per class only, so where two images of a class
use different channels an instance search makes every image faithful and a class search
cannot.
"""

import copy
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np

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


def _search(theta, assign, steps):
    logits_fn, full = _toy()
    settings = oracle.OracleSettings(
        steps=jnp.int32(steps), learning_rate=jnp.float32(0.1), rel_temperature=jnp.float32(1.0)
    )
    return oracle.search(logits_fn, full, jnp.asarray(theta), jnp.asarray(assign), 1 / N, settings)


def _drop_of_masks(masks_BxN):
    """Each image's relative drop, computed by hand on the toy (softmax of two logits)."""
    logits_fn, full = _toy()
    p = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    y = p(np.asarray(full))[np.arange(4), CLASSES]
    o = p(np.asarray(logits_fn(masks_BxN)))[np.arange(4), CLASSES]
    return np.maximum(y - o, 0) / y


IDENTITY = np.eye(4, dtype=np.float32)
ONEHOT = np.eye(K, dtype=np.float32)[CLASSES]


def test_no_steps_returns_the_start_and_its_drop():
    theta = np.asarray(jax.random.normal(jax.random.key(0), (4, N)))
    best, drop_R = _search(theta, IDENTITY, 0)
    chex.assert_trees_all_close(best, theta)
    top1 = (theta == theta.max(-1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(drop_R, _drop_of_masks(top1), rtol=1e-5, atol=1e-6)


def test_instance_search_finds_each_images_evidence():
    theta = np.zeros((4, N), np.float32)
    theta[np.arange(4), EVIDENCE] = -1.0  # the evidence starts last: every image loses
    best, drop_R = _search(theta, IDENTITY, 100)
    np.testing.assert_array_equal(np.argmax(best, -1), EVIDENCE)
    assert np.all(np.asarray(drop_R) < 0.01)


def test_each_row_keeps_its_own_best_iterate():
    """Image 0 starts on its evidence (drop 0); the others start off theirs. The batch's mean
    loss falls while image 0 may drift: its row must still return its best, the start."""
    theta = np.zeros((4, N), np.float32)
    theta[0, EVIDENCE[0]] = 1.0
    theta[1:, 2] = 1.0  # a channel nobody uses
    best, drop_R = _search(theta, IDENTITY, 30)
    assert float(drop_R[0]) == 0.0 and int(np.argmax(best[0])) == EVIDENCE[0]
    best_masks = (best == best.max(-1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(drop_R, _drop_of_masks(best_masks), rtol=1e-5, atol=1e-6)


def test_class_search_shares_one_mask_per_class_and_cannot_fit_both_images():
    theta_KxN = -np.ones((K, N), np.float32)
    theta_KxN[:, 2] = 0.0  # start on a channel no image uses
    best, drop_K = _search(theta_KxN, ONEHOT, 100)
    chex.assert_shape(best, (K, N))
    kept = np.argmax(best, -1)
    assert kept[0] in (0, 1) and kept[1] in (4, 5)  # one of its class's two channels
    # one of each class's two images loses its evidence (p_c falls from 0.998 to 0.5, a drop
    # of 0.499): the class's mean drop is half that
    lost = float(_drop_of_masks(np.zeros((4, N), np.float32))[0])
    np.testing.assert_allclose(drop_K, [lost / 2, lost / 2], rtol=1e-4)
    _, instance_drop = _search(np.asarray(best)[CLASSES], IDENTITY, 100)
    assert np.all(np.asarray(instance_drop) < 0.01)


def test_row_drops_average_each_rows_images():
    drop_B = jnp.asarray([0.2, 0.4, 1.0, 0.0])
    np.testing.assert_allclose(oracle.row_drops(drop_B, jnp.asarray(ONEHOT)), [0.3, 0.5])
    three = np.eye(3, dtype=np.float32)[[0, 0, 1, 1]]  # row 2 masks no image
    assert np.isinf(oracle.row_drops(drop_B, jnp.asarray(three))[2])


def test_standardise_rows():
    x = jnp.asarray([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    z = oracle.standardise_rows(x)
    chex.assert_trees_all_close(z.mean(-1), jnp.zeros(2), atol=1e-6)
    chex.assert_trees_all_close(z.std(-1), jnp.ones(2), atol=1e-4)
    np.testing.assert_array_equal(np.argsort(z, -1), np.argsort(x, -1))


def test_headroom_reports_the_references_beside_gencnp(tiny_config, generator_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir)
    config = copy.deepcopy(tiny_config)
    config.eval.update(reference_examples=16, reference_steps=3, densities=(0.2, 0.4))
    config.eval.update(num_examples=32, control_examples=32, batch_size=16)
    result = headroom.headroom(config, workdir)
    with open(os.path.join(workdir, "eval", "headroom.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["num_examples"] == 16 and set(result["at_density"]) == {"0.2", "0.4"}
    for row in result["at_density"].values():
        assert row["instance_reference"] <= row["class_reference"] + 1e-9
        assert sum(row["instance_sources"].values()) == 16
        assert row["reference_gain"] is None or row["reference_gain"] >= 1.0 - 1e-9
