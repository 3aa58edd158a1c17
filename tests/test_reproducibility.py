"""Same config and seed, same results: two fresh `launch.py --mode=all` runs of the tiny config
give bit-identical classifier, generator and class pathways, and identical numbers in every
JSON they write, timings excepted.

The two runs go side by side in separate processes with different `PYTHONHASHSEED`s, so an
order that hangs on string hashing (a set of site names, say) would show up too.
"""

import json
import os
import subprocess

import chex
import pytest
from helpers import ROOT, launch_cmd, launch_env

from gencnp_jax.context import inputs, loading
from gencnp_jax.io import checkpointing
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.stages import build_bank, modes

# Wall-clock measurements: the only numbers allowed to differ between the runs.
TIMING_KEYS = {"seconds", "seconds_per_image", "train_seconds", "train_steps_per_second"}
JSON_FILES = (
    "classifier/metrics.json",
    "generator/metrics.json",
    "bank/bank.json",
    "eval/results.json",
)


@pytest.fixture(scope="module")
def two_runs(tiny_config, tmp_path_factory):
    """Workdirs of two complete runs (`--mode=all`) of the same config and seed."""
    inputs.load_data(tiny_config, "train")  # prepare the data once, not by both runs at once
    root = tmp_path_factory.mktemp("reproducibility")
    workdirs = [str(root / "a"), str(root / "b")]
    procs, logs = [], []
    try:
        for i, workdir in enumerate(workdirs):
            logs.append(open(str(root / f"{i}.log"), "w"))
            procs.append(
                subprocess.Popen(
                    launch_cmd(tiny_config, workdir, "all"),
                    cwd=ROOT,
                    env=launch_env(PYTHONHASHSEED=str(i + 1)),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        with open(str(root / f"{i}.log")) as f:
            assert proc.returncode == 0, f.read()[-4000:]
    for workdir in workdirs:
        assert all(workdir_lib.is_done(mode, workdir) for mode in modes.PIPELINE), workdir
    return workdirs


def _without_timings(tree, path=""):
    if isinstance(tree, dict):
        return {
            k: _without_timings(v, f"{path}/{k}") for k, v in tree.items() if k not in TIMING_KEYS
        }
    if isinstance(tree, list):
        return [_without_timings(v, f"{path}[{i}]") for i, v in enumerate(tree)]
    return tree


def _read(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


@pytest.mark.slow  # two full tiny pipelines side by side: about 75 s on two busy cores
@pytest.mark.parametrize("name", JSON_FILES)
def test_same_numbers_in_every_json(two_runs, name):
    a, b = (_read(w, name) for w in two_runs)
    assert _without_timings(a) == _without_timings(b)
    if name == "eval/results.json":  # the comparison covered the whole evaluation
        assert len(a["methods"]) >= 8 and a["num_examples"] > 0


@pytest.mark.slow
def test_same_parameters_and_pathways(tiny_config, two_runs):
    a, b = two_runs
    classifier_a = loading.load_classifier(tiny_config, a)
    classifier_b = loading.load_classifier(tiny_config, b)
    chex.assert_trees_all_equal(classifier_a.state, classifier_b.state)
    gen_a, _, means_a = loading.load_generator(tiny_config, a, classifier_a)
    gen_a = gen_a.state
    gen_b, _, means_b = loading.load_generator(tiny_config, b, classifier_b)
    gen_b = gen_b.state
    chex.assert_trees_all_equal(gen_a, gen_b)
    chex.assert_trees_all_equal(means_a, means_b)
    bank_a = build_bank.load_bank(tiny_config, a, classifier_a)
    bank_b = build_bank.load_bank(tiny_config, b, classifier_b)
    chex.assert_trees_all_equal(bank_a, bank_b)
    assert bank_a.fingerprint == bank_b.fingerprint


@pytest.mark.slow
def test_same_train_states_with_optimizer(two_runs):
    """The last checkpoints' checksums: Adam's moments and step count, the class-score bank."""
    for stage in ("classifier", "generator"):
        sums = []
        for workdir in two_runs:
            ckpt_dir = os.path.join(workdir, stage, "checkpoints")
            last = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
            with open(os.path.join(ckpt_dir, str(last), "meta", "metadata")) as f:
                sums.append((last, json.load(f)[checkpointing.CHECKSUM_KEY]))
        assert sums[0] == sums[1], stage
