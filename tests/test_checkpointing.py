"""Checkpointer: bit-identical round trip of a classifier train state, empty dirs, repeated
steps, retention, and the fallback past damaged steps."""

import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.context import loading
from gencnp_jax.io import checkpointing
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import loop as train_loop


def _perturb(tree, seed):
    """Adds distinct, non-trivial values to every float leaf (sines: cheap to compile, unlike
    a random draw per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jnp.floating):
            phase = jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) * (0.37 + 0.01 * i)
            x = x + 0.1 * jnp.sin(phase + seed)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(scope="module")
def train_state(tiny_config):
    """A classifier `TrainState` with random params and batch stats, and Adam moments.

    Built abstractly then filled in one jitted program: only the structure, shapes and
    dtypes of a real train state matter here, and eager initialisation compiles per shape.
    """
    template = jax.eval_shape(lambda: loading.classifier_template(tiny_config)[1])
    tx = train_classifier.make_optimizer(1e-2, 1e-4, 1, 100, 1.0)

    @jax.jit
    def make():
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)
        params = _perturb(zeros["params"], 1.0)
        opt_state = tx.init(params)
        for _ in range(2):  # step count 2, non-zero first and second moments
            updates, opt_state = tx.update(_perturb(zeros["params"], 2.0), opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        return train_loop.TrainState(params, _perturb(zeros["rest"], 3.0), opt_state)

    return make()


def _save(directory, step, state, meta=None, **kwargs):
    ckpt = checkpointing.Checkpointer(str(directory), **kwargs)
    ckpt.save(step, state, meta)
    ckpt.close()


def _restore(directory, template, step=None):
    ckpt = checkpointing.Checkpointer(str(directory))
    out = ckpt.restore(template, step)
    ckpt.close()
    return out


def _shifted(state, delta):
    return jax.tree.map(lambda x: x + delta if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def test_round_trip_is_bit_identical(train_state, tmp_path):
    leaves = jax.tree.leaves(train_state)
    assert any(jnp.issubdtype(x.dtype, jnp.integer) for x in leaves)  # Adam's step count
    assert len(jax.tree.leaves(train_state.rest)) > 0  # BatchNorm statistics
    meta = {"note": "classifier", "steps": [1, 2]}
    _save(tmp_path, 7, train_state, meta)
    # Restore into a template that holds other values: only its structure may matter.
    step, restored, restored_meta = _restore(tmp_path, _shifted(train_state, 1.0))
    assert step == 7 and restored_meta == meta
    assert jax.tree.structure(restored) == jax.tree.structure(train_state)
    chex.assert_trees_all_equal(restored, train_state, strict=True)  # values, dtypes, shapes


def test_restore_of_an_empty_dir_is_none(train_state, tmp_path):
    assert _restore(tmp_path / "never_written", train_state) is None
    ckpt = checkpointing.Checkpointer(str(tmp_path / "empty"))
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    assert ckpt.restore(train_state) is None
    ckpt.close()


def test_saving_an_existing_step_is_a_no_op(train_state, tmp_path):
    _save(tmp_path, 3, train_state, {"first": True})
    _save(tmp_path, 3, _shifted(train_state, 5.0), {"first": False})
    step, restored, meta = _restore(tmp_path, train_state)
    assert step == 3 and meta == {"first": True}
    chex.assert_trees_all_equal(restored, train_state)


def test_keeps_the_newest_steps_and_restores_any_kept_one(tmp_path):
    state = {"w": jnp.arange(4.0), "count": jnp.int32(0)}
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": state["w"] * step, "count": jnp.int32(step)})
    assert ckpt.steps() == [2, 3] and ckpt.latest_step() == 3
    ckpt.close()
    step, restored, _ = _restore(tmp_path, state)  # the newest by default
    assert step == 3 and int(restored["count"]) == 3
    step, restored, _ = _restore(tmp_path, state, step=2)
    assert step == 2
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) * 2)


def test_damaged_steps_fall_back_then_fail_clearly(tmp_path, caplog):
    state = {"w": jnp.arange(3.0)}
    for step in (1, 2):
        _save(tmp_path, step, {"w": state["w"] + step})
    shutil.rmtree(os.path.join(tmp_path, "2", "state"))
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        step, restored, _ = _restore(tmp_path, state)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 1)
    assert any("step 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    shutil.rmtree(os.path.join(tmp_path, "1", "state"))
    with pytest.raises(checkpointing.CheckpointError, match=r"steps \[2, 1\].*Delete that"):
        _restore(tmp_path, state)
