"""Crash-safe resume: a training process killed with SIGKILL and run again ends with the
parameters of an uninterrupted run, bit for bit; damaged checkpoints are skipped with a
warning naming them, and when none is usable the run stops with one error saying what to delete.

The kill tests run launch.py for real (tests/helpers.py): the run is stopped as soon as
its first checkpoint is committed, mid-training, and the same command is run again; the
classifier's is killed a second time right after its last step is committed (while it saves
its final checkpoint or evaluates), then run to the end.
"""

import json
import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_ok, committed_steps, kill_when, run_launch

from gencnp_jax.context import loading
from gencnp_jax.io import checkpointing
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.stages import pipeline
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import loop as train_loop

# Long enough that the kill lands mid-training (the first checkpoint comes at step 8).
CLASSIFIER_FLAGS = ("--config.classifier.epochs=10",)  # 160 steps of 32 on 512 images
CLASSIFIER_STEPS = 160
GENERATOR_FLAGS = ("--config.generator.steps=120",)
GENERATOR_STEPS = 120


def _checkpoint_sum(ckpt_dir: str, step: int) -> str:
    """The checksum of the whole train state (with optimizer state) saved at `step`."""
    with open(os.path.join(ckpt_dir, str(step), "meta", "metadata")) as f:
        return json.load(f)[checkpointing.CHECKSUM_KEY]


def _metrics(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "metrics.json")) as f:
        return json.load(f)


def _kill_and_check(config, workdir, mode, ckpt_dir, ready, total, flags) -> int:
    """Kills a run of `mode` once `ready()`; checks it stopped before its end. Returns the
    newest committed step at the kill (the one the next run must resume from)."""
    output = kill_when(config, workdir, mode, ready, *flags)
    steps = committed_steps(ckpt_dir)
    stage_dir = os.path.dirname(ckpt_dir)
    assert not os.path.exists(os.path.join(stage_dir, "metrics.json")), output[-2000:]
    assert steps and steps[-1] <= total, (steps, output[-2000:])
    return steps[-1]


@pytest.fixture(scope="module")
def classifier_runs(tiny_config, tmp_path_factory):
    """`(uninterrupted, resumed, kill steps)`: the second run was SIGKILLed twice, first
    mid-training (just after its first checkpoint), then after its last step (saving the
    final checkpoint or evaluating), and run again each time."""
    root = tmp_path_factory.mktemp("classifier_resume")
    full, resumed = str(root / "full"), str(root / "resumed")
    assert_ok(run_launch(tiny_config, full, "train_classifier", *CLASSIFIER_FLAGS))
    ckpt_dir = os.path.join(workdir_lib.classifier_dir(resumed), "checkpoints")
    kill = lambda ready: _kill_and_check(
        tiny_config, resumed, "train_classifier", ckpt_dir, ready, CLASSIFIER_STEPS,
        CLASSIFIER_FLAGS,
    )  # fmt: skip
    first = kill(lambda: bool(committed_steps(ckpt_dir)))
    assert first < CLASSIFIER_STEPS
    second = kill(lambda: CLASSIFIER_STEPS in committed_steps(ckpt_dir))
    assert second == CLASSIFIER_STEPS
    assert_ok(run_launch(tiny_config, resumed, "train_classifier", *CLASSIFIER_FLAGS))
    return full, resumed, (first, second)


def test_killed_classifier_run_resumes_to_identical_parameters(tiny_config, classifier_runs):
    full, resumed, (_, last_kill) = classifier_runs
    metrics = _metrics(workdir_lib.classifier_dir(resumed))
    assert metrics["resumed_from_step"] == last_kill
    assert metrics["train_steps"] == CLASSIFIER_STEPS
    chex.assert_trees_all_equal(
        loading.load_classifier(tiny_config, resumed).state,
        loading.load_classifier(tiny_config, full).state,
    )
    # the whole train state, Adam's moments and step count included
    dirs = [os.path.join(workdir_lib.classifier_dir(w), "checkpoints") for w in (full, resumed)]
    assert _checkpoint_sum(dirs[0], CLASSIFIER_STEPS) == _checkpoint_sum(dirs[1], CLASSIFIER_STEPS)
    assert metrics["test_accuracy"] == _metrics(workdir_lib.classifier_dir(full))["test_accuracy"]


@pytest.mark.slow  # two generator runs and a kill: about 40 s on two busy cores
def test_killed_generator_run_resumes_to_identical_parameters(
    tiny_config, classifier_runs, tmp_path
):
    full_classifier = classifier_runs[0]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    for workdir in (full, resumed):
        shutil.copytree(
            workdir_lib.classifier_dir(full_classifier), workdir_lib.classifier_dir(workdir)
        )
    assert_ok(run_launch(tiny_config, full, "train_generator", *GENERATOR_FLAGS))
    ckpt_dir = os.path.join(workdir_lib.generator_dir(resumed), "checkpoints")
    killed_at = _kill_and_check(
        tiny_config, resumed, "train_generator", ckpt_dir,
        lambda: bool(committed_steps(ckpt_dir)), GENERATOR_STEPS, GENERATOR_FLAGS,
    )  # fmt: skip
    assert killed_at < GENERATOR_STEPS
    assert_ok(run_launch(tiny_config, resumed, "train_generator", *GENERATOR_FLAGS))

    metrics = _metrics(workdir_lib.generator_dir(resumed))
    assert metrics["resumed_from_step"] == killed_at
    classifier = loading.load_classifier(tiny_config, full)
    gen_full, _, means_full = loading.load_generator(tiny_config, full, classifier)
    state_full = gen_full.state
    gen_resumed, _, means_resumed = loading.load_generator(tiny_config, resumed, classifier)
    state_resumed = gen_resumed.state
    chex.assert_trees_all_equal(state_resumed, state_full)
    chex.assert_trees_all_equal(means_resumed, means_full)
    # generator, optimizer state and the class-score bank of the pull loss
    dirs = [os.path.join(workdir_lib.generator_dir(w), "checkpoints") for w in (full, resumed)]
    assert _checkpoint_sum(dirs[0], GENERATOR_STEPS) == _checkpoint_sum(dirs[1], GENERATOR_STEPS)
    reference = _metrics(workdir_lib.generator_dir(full))
    for key in ("agreement", "density_mean", "mDC", "mIC", "leakage"):
        assert metrics[key] == reference[key], key


# --- damaged checkpoints ------------------------------------------------------------------


def _damage(step_dir: str, how: str) -> None:
    """Damages a step's arrays: `truncate` every ocdbt data file to half its size, or `flip`
    16 bytes in the middle of the largest one (raw array bytes: orbax reads them without
    complaint, only the checksum catches it)."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d"  # ocdbt data files
    ]
    assert files, step_dir
    if how == "flip":
        files = [max(files, key=os.path.getsize)]
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            if how == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size // 2)
                chunk = f.read(16)
                f.seek(size // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))


def _copy_classifier_checkpoints(trained_workdir: str, workdir: str) -> str:
    """A workdir holding only the trained run's `classifier/checkpoints` (steps 24 and 32)."""
    ckpt_dir = os.path.join(workdir_lib.classifier_dir(workdir), "checkpoints")
    shutil.copytree(
        os.path.join(workdir_lib.classifier_dir(trained_workdir), "checkpoints"), ckpt_dir
    )
    assert committed_steps(ckpt_dir) == [24, 32]
    return ckpt_dir


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    how, tiny_config, trained_workdir, tmp_path, caplog
):
    workdir = str(tmp_path / "run")
    ckpt_dir = _copy_classifier_checkpoints(trained_workdir, workdir)
    _damage(os.path.join(ckpt_dir, "32"), how)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        metrics = train_classifier.train_classifier(tiny_config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    damaged = [w for w in warnings if f"step 32 in {ckpt_dir} is damaged" in w]
    assert len(damaged) == 1, warnings
    if how == "flip":
        assert "do not match the checksum" in damaged[0]
    assert metrics["resumed_from_step"] == 24
    chex.assert_trees_all_equal(
        loading.load_classifier(tiny_config, workdir).state,
        loading.load_classifier(tiny_config, trained_workdir).state,
    )
    # the damaged step was replaced by the resumed run's (good) step 32
    caplog.clear()
    tx = train_classifier.make_optimizer(1e-3, 0.0, 1, 10, 1.0)
    fresh = lambda: train_loop.TrainState.create(loading.classifier_template(tiny_config)[0], tx)
    template = jax.eval_shape(lambda: fresh()[1])
    ckpt = checkpointing.Checkpointer(ckpt_dir)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        step, _, _ = ckpt.restore(template)
    ckpt.close()
    assert step == 32 and not caplog.records


def test_no_usable_checkpoint_is_one_clear_error(tiny_config, trained_workdir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    ckpt_dir = _copy_classifier_checkpoints(trained_workdir, workdir)
    for step in ("24", "32"):
        _damage(os.path.join(ckpt_dir, step), "flip")
    with pytest.raises(SystemExit) as exit_info:
        pipeline.run("train_classifier", tiny_config, workdir)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: no usable checkpoint in {ckpt_dir}: steps [32, 24] are damaged or were saved "
        "with another config (see the warnings above). Delete that directory to start this "
        "stage over, or use another --workdir."
    ), err
    assert "Traceback" not in "\n".join(err)


def _restore(directory, template):
    ckpt = checkpointing.Checkpointer(directory)
    try:
        return ckpt.restore(template)
    finally:
        ckpt.close()


def test_a_half_written_step_is_ignored_and_replaced(tmp_path):
    """What a process killed inside `save` leaves: orbax's temporary step dir, never committed."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory)
    ckpt.save(8, {"w": jnp.arange(3.0)})
    ckpt.close()
    shutil.copytree(
        os.path.join(directory, "8"), os.path.join(directory, "16.orbax-checkpoint-tmp-1")
    )
    os.remove(os.path.join(directory, "16.orbax-checkpoint-tmp-1", "commit_success.txt"))
    ckpt = checkpointing.Checkpointer(directory)
    assert ckpt.steps() == [8]
    step, restored, _ = ckpt.restore({"w": jnp.zeros(3)})
    assert step == 8
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    ckpt.save(16, {"w": jnp.arange(3.0) + 16})
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["16", "8"]  # the leftover is cleaned up
    step, restored, _ = _restore(directory, {"w": jnp.zeros(3)})
    assert step == 16
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 16)


def test_a_damaged_step_is_rewritten_when_the_run_reaches_it_again(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    w = np.random.default_rng(0).normal(size=4096).astype(np.float32)  # incompressible
    ckpt = checkpointing.Checkpointer(directory)
    for step in (8, 16):
        ckpt.save(step, {"w": jnp.asarray(w + step)})
    ckpt.close()
    _damage(os.path.join(directory, "16"), "flip")
    ckpt = checkpointing.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        step, _, _ = ckpt.restore({"w": jnp.zeros(4096)})
    assert step == 8 and "step 16" in caplog.text and "checksum" in caplog.text
    ckpt.save(16, {"w": jnp.asarray(w + 16)})  # a resumed run reaching step 16 again
    ckpt.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        step, restored, meta = _restore(directory, {"w": jnp.zeros(4096)})
    assert step == 16 and meta == {} and not caplog.records
    np.testing.assert_array_equal(restored["w"], w + 16)


def test_checksum_covers_every_leaf():
    tree = {"a": jnp.arange(4.0), "b": {"c": jnp.int32(3)}}
    same = {"a": jnp.arange(4.0), "b": {"c": jnp.int32(3)}}
    assert checkpointing.tree_checksum(tree) == checkpointing.tree_checksum(same)
    for other in (
        {"a": jnp.arange(4.0).at[2].set(2.5), "b": {"c": jnp.int32(3)}},
        {"a": jnp.arange(4.0), "b": {"c": jnp.int32(4)}},
        {"a": jnp.arange(4.0).reshape(2, 2), "b": {"c": jnp.int32(3)}},
        {"a": jnp.arange(4.0, dtype=jnp.bfloat16), "b": {"c": jnp.int32(3)}},
    ):
        assert checkpointing.tree_checksum(other) != checkpointing.tree_checksum(tree)
