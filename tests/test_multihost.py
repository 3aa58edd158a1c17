"""Multi-device and multi-host checks of the generator train step, each in subprocesses.

- the step on meshes of 2 and 4 forced host devices gives the 1-device result;
- two processes on 127.0.0.1 (gloo CPU collectives) run `train_generator` of the tiny config
  as one 2-device mesh: identical parameters in both, one checkpoint, logs written once;
- `sharding.process_0_first` lets two processes prepare a fresh TFDS dir without a race.

The worker code is scripts/multihost_smoke.py; every subprocess is killed on failure.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "multihost_smoke.py"
)
sys.path.insert(0, os.path.dirname(SCRIPT))
import multihost_smoke  # noqa: E402

from gencnp_jax.context import loading  # noqa: E402
from gencnp_jax.io import workdir as workdir_lib  # noqa: E402

# Compile time dominates these runs on CPU; the XLA backend's -O0 halves it and every mesh
# size compiles at the same level, so the comparisons stay like for like.
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


def _data_flags(config) -> list[str]:
    return [
        "--config=configs/tiny.py",
        f"--config.data.manual_dir={config.data.manual_dir}",
        f"--config.data.data_dir={config.data.data_dir}",
    ]


def _logs(folder: str) -> str:
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".log"):
            with open(os.path.join(folder, name)) as f:
                out.append(f"--- {name}\n" + "".join(f.readlines()[-25:]))
    return "\n".join(out)


def test_generator_step_matches_one_device_on_2_and_4_devices(tiny_config, tmp_path):
    out = str(tmp_path / "devices.npz")
    # leak_margin > 0: at the start every gate is open, the pathway *is* the full model and the
    # leakage hinge sits on its kink at 0, where float noise of ~1e-8 (which differs between
    # layouts) decides whether its gradient flows. A margin keeps the check about sharding.
    # The capped top-1 hinge has the same kink there (min(m, full margin) - pathway margin = 0):
    # its weight 0 leaves it out of the step.
    cmd = [
        sys.executable,
        SCRIPT,
        "--task=devices",
        "--counts=1,2,4",
        "--steps=3",
        f"--out={out}",
        *_data_flags(tiny_config),
        "--config.generator.loss.leak_margin=0.01",
        "--config.generator.loss.w_hinge=0.0",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **FAST_COMPILE},
        cwd=os.path.dirname(os.path.dirname(SCRIPT)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = np.load(out)
    keys = [
        k.split("|", 1)[1]
        for k in saved.files
        if k.startswith("1|") and not k.endswith(("metrics", "compilations"))
    ]
    assert any("score_heads" in k for k in keys)
    reference_metrics = json.loads(str(saved["1|metrics"]))
    for n in (2, 4):
        assert int(saved[f"{n}|compilations"]) == 1
        for key in keys:
            np.testing.assert_allclose(
                saved[f"{n}|{key}"],
                saved[f"1|{key}"],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{n} devices: {key}",
            )
        metrics = json.loads(str(saved[f"{n}|metrics"]))
        for step, (got, want) in enumerate(zip(metrics, reference_metrics, strict=True)):
            for name, value in want.items():
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (n, step, name)


def test_two_processes_train_generator_as_one_mesh(tiny_config, trained_workdir, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(
        workdir_lib.classifier_dir(trained_workdir), workdir_lib.classifier_dir(workdir)
    )
    out = str(tmp_path / "out")
    os.makedirs(out)
    steps = 4
    flags = [
        f"--workdir={workdir}",
        *_data_flags(tiny_config),
        "--config.cpu_devices=1",
        f"--config.generator.steps={steps}",
        "--config.train.checkpoint_every=2",
        "--config.train.log_every=2",
    ]
    procs = multihost_smoke.start_workers(flags, 2, out, out, env=FAST_COMPILE)
    codes = multihost_smoke.wait_all(procs, timeout=300)
    assert codes == [0, 0], _logs(out)

    infos = []
    for pid in range(2):
        with open(os.path.join(out, f"info_{pid}.json")) as f:
            infos.append(json.load(f))
    assert [i["process_index"] for i in infos] == [0, 1]
    assert all(i["process_count"] == 2 and i["device_count"] == 2 for i in infos)
    assert all(i["compilations"] == 1 for i in infos)

    def timeless_of(tree):  # wall times differ between processes, at any depth
        if not isinstance(tree, dict):
            return tree
        return {k: timeless_of(v) for k, v in tree.items() if "second" not in k}

    timeless = [timeless_of(i["result"]) for i in infos]
    assert timeless[0]["pio_targets"]["num_images"] == 64  # the distill term's masks, too
    assert timeless[0] == timeless[1]  # test metrics of the batches gathered from both hosts

    params = [np.load(os.path.join(out, f"params_{pid}.npz")) for pid in range(2)]
    assert params[0].files == params[1].files and len(params[0].files) > 20
    for key in params[0].files:
        np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)

    # one checkpoint, written together; the final generator is what both processes hold
    gen_dir = workdir_lib.generator_dir(workdir)
    assert sorted(os.listdir(os.path.join(gen_dir, "checkpoints"))) == ["2", "4"]
    assert os.listdir(os.path.join(gen_dir, "final")) == [str(steps)]
    classifier = loading.load_classifier(tiny_config, workdir)
    gen_state = loading.load_generator(tiny_config, workdir, classifier)[0].state
    restored = multihost_smoke._flatten(gen_state)
    matched = 0
    for key in params[0].files:
        path = key.split("|", 1)[1]
        if path in restored:
            np.testing.assert_array_equal(restored[path], params[0][key], err_msg=path)
            matched += 1
    assert matched == len(params[0].files)  # every parameter (one device per process)

    # logs written once (process 0 only): each step's train metrics appear once
    with open(os.path.join(gen_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in rows if "train/density" in r]
    assert train_steps == [2, 4]
    assert os.path.exists(os.path.join(gen_dir, "metrics.json"))


def test_process_0_first_prepares_a_fresh_dataset_once(tiny_config, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    flags = [
        "--config=configs/tiny.py",
        f"--config.data.manual_dir={tiny_config.data.manual_dir}",
        f"--config.data.data_dir={tmp_path / 'fresh_tfds'}",
        "--config.cpu_devices=1",
    ]
    procs = multihost_smoke.start_workers(flags, 2, out, out, task="load_data")
    codes = multihost_smoke.wait_all(procs, timeout=180)
    assert codes == [0, 0], _logs(out)
    seen = []
    for pid in range(2):
        with open(os.path.join(out, f"data_{pid}.json")) as f:
            seen.append(json.load(f))
    assert seen[0] == seen[1] and seen[0]["train"][0] > 0
