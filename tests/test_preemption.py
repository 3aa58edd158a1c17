"""Preemption: SIGTERM of a training stage saves the step it reached, says how to resume and
exits within the grace period; the rerun ends bit-identical to an uninterrupted run. Also the
SIGTERM / SIGINT guard's installation, and a full disk during a checkpoint save.

The SIGTERM tests run launch.py for real (tests/helpers.py) on the tiny config: when
metrics.jsonl shows a randomly drawn logged step, the process is frozen (SIGSTOP), sent SIGTERM
and thawed (SIGCONT), so the signal lands mid-training however fast the tiny steps are. The
uninterrupted references are the session's `trained_workdir` / `generator_workdir`.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, assert_ok, launch_cmd, launch_env, run_launch

from gencnp_jax.context import loading
from gencnp_jax.io import checkpointing, preemption
from gencnp_jax.io import workdir as workdir_lib

GRACE_S = preemption.GRACE_S
STOPPED = re.compile(r"^error: stopped by SIGTERM at step (\d+), checkpoint saved in (\S+); "
                     r"resume with: \S*python\S* \S+launch\.py .*--mode=(\w+)")  # fmt: skip


def _logged_step(jsonl: str) -> int:
    if not os.path.exists(jsonl):
        return 0
    with open(jsonl) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
    return max(steps, default=0)


def _sigterm_at(config, workdir: str, mode: str, jsonl: str, target: int):
    """Runs launch.py; SIGTERMs it once `jsonl` logs step `target`. Returns `(rc, stderr,
    seconds from the signal to the exit)`."""
    err_path = os.path.join(os.path.dirname(workdir), f"sigterm_{mode}.err")
    with open(err_path, "w") as err, open(os.devnull, "w") as out:
        proc = subprocess.Popen(
            launch_cmd(config, workdir, mode), cwd=ROOT, env=launch_env(), stdout=out, stderr=err
        )
        try:
            deadline = time.monotonic() + 300
            while _logged_step(jsonl) < target:
                assert proc.poll() is None, f"{mode} ended (rc={proc.returncode}) early"
                assert time.monotonic() < deadline
                time.sleep(0.002)
            proc.send_signal(signal.SIGSTOP)  # freeze: the signal lands at this very step
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=GRACE_S + 30)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(err_path) as f:
        return proc.returncode, f.read(), seconds


def _check_stopped(rc: int, stderr: str, seconds: float, ckpt_dir: str, mode: str, total: int):
    """The one line the user sees, the exit status and time; returns the step saved."""
    assert rc == 128 + signal.SIGTERM, f"rc={rc}\n{stderr[-3000:]}"
    last = stderr.strip().splitlines()[-1]
    match = STOPPED.match(last)
    assert match, last
    step = int(match.group(1))
    assert match.group(2) == ckpt_dir and match.group(3) == mode, last
    assert 0 < step < total, last
    assert os.path.exists(os.path.join(ckpt_dir, str(step), "commit_success.txt"))
    assert not os.path.exists(os.path.join(os.path.dirname(ckpt_dir), "metrics.json"))
    assert "Traceback" not in stderr
    assert seconds < GRACE_S, seconds
    print(f"{mode}: SIGTERM -> exit {seconds:.2f} s, stopped at step {step}: {last}")
    return step


def _checkpoint_sum(ckpt_dir: str, step: int) -> str:
    with open(os.path.join(ckpt_dir, str(step), "meta", "metadata")) as f:
        return json.load(f)[checkpointing.CHECKSUM_KEY]


def _metrics(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "metrics.json")) as f:
        return json.load(f)


def test_sigterm_classifier_then_rerun_is_bit_identical(tiny_config, trained_workdir, tmp_path):
    total = 32  # tiny: 2 epochs of 16 steps, logged every 4
    target = random.Random().choice(range(4, 24, 4))
    workdir = str(tmp_path / "run")
    stage_dir = workdir_lib.classifier_dir(workdir)
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    rc, err, seconds = _sigterm_at(
        tiny_config, workdir, "train_classifier", os.path.join(stage_dir, "metrics.jsonl"), target
    )
    step = _check_stopped(rc, err, seconds, ckpt_dir, "train_classifier", total)
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released on the way out
    assert_ok(run_launch(tiny_config, workdir, "train_classifier"))
    metrics = _metrics(stage_dir)
    assert metrics["resumed_from_step"] == step
    chex.assert_trees_all_equal(
        loading.load_classifier(tiny_config, workdir).state,
        loading.load_classifier(tiny_config, trained_workdir).state,
    )
    ref_ckpt = os.path.join(workdir_lib.classifier_dir(trained_workdir), "checkpoints")
    assert _checkpoint_sum(ckpt_dir, total) == _checkpoint_sum(ref_ckpt, total)
    reference = _metrics(workdir_lib.classifier_dir(trained_workdir))
    for key in ("test_accuracy", "random_drop10_agreement"):
        assert metrics[key] == reference[key], key


def test_sigterm_generator_then_rerun_is_bit_identical(tiny_config, generator_workdir, tmp_path):
    total = 24  # tiny generator steps, logged every 4
    target = random.Random().choice(range(4, 16, 4))
    workdir = str(tmp_path / "run")
    shutil.copytree(
        workdir_lib.classifier_dir(generator_workdir), workdir_lib.classifier_dir(workdir)
    )
    stage_dir = workdir_lib.generator_dir(workdir)
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    rc, err, seconds = _sigterm_at(
        tiny_config, workdir, "train_generator", os.path.join(stage_dir, "metrics.jsonl"), target
    )
    step = _check_stopped(rc, err, seconds, ckpt_dir, "train_generator", total)
    assert_ok(run_launch(tiny_config, workdir, "train_generator"))
    metrics = _metrics(stage_dir)
    assert metrics["resumed_from_step"] == step
    classifier = loading.load_classifier(tiny_config, workdir)
    resumed = loading.load_generator(tiny_config, workdir, classifier)[0].state
    full = loading.load_generator(tiny_config, generator_workdir, classifier)[0].state
    chex.assert_trees_all_equal(resumed, full)
    ref_ckpt = os.path.join(workdir_lib.generator_dir(generator_workdir), "checkpoints")
    assert _checkpoint_sum(ckpt_dir, total) == _checkpoint_sum(ref_ckpt, total)
    reference = _metrics(workdir_lib.generator_dir(generator_workdir))
    for key in ("agreement", "density_mean", "mDC", "leakage"):
        assert metrics[key] == reference[key], key


# --- the guard itself ---------------------------------------------------------------------


def test_guard_restores_the_previous_handlers_and_stops_outside_the_loop():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    guard = preemption.StopGuard(5.0, "python launch.py --mode=x")
    with pytest.raises(preemption.Preempted) as info, guard:
        assert preemption.active() is guard
        guard.where, guard.resume_step = "/ckpt", 8
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # the handler raises in this thread before the sleep ends
    assert str(info.value) == (
        "stopped by SIGTERM; the last checkpoint is step 8 in /ckpt: a rerun resumes from it; "
        "resume with: python launch.py --mode=x"
    )
    assert info.value.exit_code == 143
    assert preemption.active() is None
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_guard_in_the_loop_only_sets_the_flag():
    with preemption.StopGuard(5.0, "cmd") as guard, pytest.raises(preemption.Preempted):
        with guard.polling():
            assert not guard.should_stop(3)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert guard.should_stop(4)  # no exception in the step: the loop decides
            assert guard.signum == signal.SIGINT
    # leaving the polling region with the flag set ends the stage (no step left to save)


# --- full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: str, leave: int) -> None:
    stat = os.statvfs(mount)
    with open(os.path.join(mount, "filler"), "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_full_disk_checkpoint_is_one_line_and_keeps_the_previous_step(small_fs, caplog):
    directory = os.path.join(small_fs, "ckpt")
    w = np.random.default_rng(0).normal(size=100_000).astype(np.float32)  # 400 KB, incompressible
    ckpt = checkpointing.Checkpointer(directory)
    ckpt.save(8, {"w": jnp.asarray(w)})
    _fill(small_fs, leave=200_000)
    with pytest.raises(checkpointing.CheckpointError) as info:
        ckpt.save(16, {"w": jnp.asarray(w + 16)})
    message = str(info.value)
    print(message)
    assert re.fullmatch(
        rf"no space left on device: checkpoint step 16 could not be saved in {directory} "
        r"\(0\.\d MiB free there; a checkpoint takes about 0\.\d MiB\); the checkpoint of step 8 "
        r"is kept and a rerun resumes from it: free some space or use another --workdir",
        message,
    ), message
    assert "\n" not in message
    assert not [r for r in caplog.records if "No space left" in r.getMessage()]
    assert sorted(os.listdir(directory)) == ["8"]  # the half-written step 16 is removed
    again = checkpointing.Checkpointer(directory)
    step, restored, _ = again.restore({"w": jnp.zeros(100_000)})
    again.close()
    assert step == 8
    np.testing.assert_array_equal(restored["w"], w)


WATCHDOG = """
import os, signal, sys, time
from gencnp_jax.io import preemption
from gencnp_jax.context import loading
from gencnp_jax.io import workdir as workdir_lib
with preemption.StopGuard(float(sys.argv[1]), "python launch.py --mode=x") as guard:
    guard.where, guard.resume_step = "/ckpt", 8
    with guard.polling():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a step that never ends
"""


def test_a_step_longer_than_the_grace_period_exits_in_time():
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WATCHDOG, "4"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: SIGTERM: the current step did not end within the 4 s grace period; the last "
        "checkpoint is step 8 in /ckpt: a rerun resumes from it; resume with: python launch.py "
        "--mode=x"
    )
    assert seconds < 4 + 3, seconds  # with the interpreter's start
