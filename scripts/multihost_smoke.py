"""Multi-device and multi-host checks of the generator train step, on CPU, in subprocesses.

    # one process, forced host devices: the step on meshes of 1, 2 and 4 devices
    python scripts/multihost_smoke.py --task=devices --counts=1,2,4 --out=/tmp/devices.npz
    # one of N processes of a real multi-host `train_generator` (gloo collectives on CPU)
    python scripts/multihost_smoke.py --task=worker --coordinator_address=127.0.0.1:PORT \
        --num_processes=2 --process_id=I --workdir=W --out=DIR --config=configs/tiny.py ...
    # one of N processes loading the data, process 0 first (it prepares the TFDS files)
    python scripts/multihost_smoke.py --task=load_data --coordinator_address=... --out=DIR ...
    # the whole two-process smoke run on the tiny config (trains the classifier first)
    python scripts/multihost_smoke.py --task=run --workdir=/tmp/mh --config=configs/tiny.py

tests/test_multihost.py drives the first three; `run` is the same check by hand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Flags are defined only when this file runs as a script (`_define_flags` under __main__):
# tests import it for `start_workers` and `wait_all`, next to the package's own --config flag.
FLAGS = None


def _define_flags():
    """The script's flags, as a namespace of absl flag holders."""
    import types

    return types.SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", "configs/tiny.py", lock_config=False),
        task=flags.DEFINE_enum(
            "task", "run", ["devices", "worker", "load_data", "run"], "What to do."
        ),
        workdir=flags.DEFINE_string("workdir", None, "Shared workdir (worker, run)."),
        out=flags.DEFINE_string("out", None, "Output file (devices) or folder (worker)."),
        counts=flags.DEFINE_list("counts", ["1", "2", "4"], "Mesh sizes for --task=devices."),
        steps=flags.DEFINE_integer("steps", 3, "Generator steps for --task=devices."),
        sgd_lr=flags.DEFINE_float(
            "sgd_lr",
            0.05,
            "--task=devices: plain SGD at this rate (0 = the config's Adam schedule).",
        ),
        coordinator=flags.DEFINE_string("coordinator_address", None, "host:port of process 0."),
        num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index."),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flatten(tree) -> dict:
    import jax
    import numpy as np

    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def generator_steps_on_meshes(config, counts, steps: int, sgd_lr: float = 0.0) -> dict:
    """Runs `steps` generator train steps from the same start on a mesh of each size.

    With `sgd_lr > 0` the optimizer is plain SGD: Adam divides by the root of the second
    moment, which turns float noise in a near-zero gradient into a full-size update, so
    parameters after Adam differ by about the learning rate between meshes even when the
    gradients agree to float precision. The classifier is a fresh tiny one (its weights do not
    matter for equality); the batches are fixed random images.

    Returns:
      `{n: {"params": flat dict, "metrics": [dicts], "compilations": int}}`.
    """
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gencnp_jax.context import loading
    from gencnp_jax.io import data, sharding
    from gencnp_jax.models.frozen import FrozenClassifier
    from gencnp_jax.train import generator as train_generator

    hwc, num_classes = data.dataset_info(config.data.dataset)
    model = loading.new_classifier(config, num_classes, hwc[-1])
    cls_graphdef, cls_state = nnx.split(model)
    classifier = FrozenClassifier(cls_graphdef, cls_state, model.site_channels, num_classes)
    rng = np.random.default_rng(config.seed)
    batches = rng.normal(0, 1.5, (steps, config.train.batch_size, *hwc)).astype(np.float32)
    results = {}
    for n in counts:
        mesh = sharding.make_mesh(n)
        gen_graphdef, tx, state = train_generator.init_state(config, classifier)
        if sgd_lr > 0:
            tx = optax.sgd(sgd_lr)
            state = state.replace(opt_state=tx.init(state.params))
        state, cls_dev = sharding.replicate(mesh, (state, classifier))
        hp, weights = train_generator.hparams_from_config(config.generator)
        terms = weights.active()
        hp, weights = sharding.replicate(mesh, (hp, weights))
        step_fn = train_generator.make_train_step(gen_graphdef, tx, terms)
        metrics = []
        for step in range(steps):
            images = sharding.shard_batch(mesh, batches[step])
            state, out = step_fn(state, images, jnp.int32(step), cls_dev, weights, hp)
            metrics.append({k: float(v) for k, v in out.items()})
        results[n] = {
            "params": _flatten(sharding.to_host(state.params)),
            "metrics": metrics,
            "compilations": step_fn._cache_size(),
        }
        print(f"mesh of {n}: loss {metrics[-1]['loss/total']:.6f}", flush=True)
    return results


def _task_devices():
    import jax
    import numpy as np

    counts = [int(c) for c in FLAGS.counts.value]
    jax.config.update("jax_num_cpu_devices", max(counts))
    results = generator_steps_on_meshes(
        FLAGS.config.value, counts, FLAGS.steps.value, FLAGS.sgd_lr.value
    )
    flat = {}
    for n, r in results.items():
        for k, v in r["params"].items():
            flat[f"{n}|{k}"] = v
        flat[f"{n}|metrics"] = np.asarray(json.dumps(r["metrics"]))
        flat[f"{n}|compilations"] = np.asarray(r["compilations"])
    np.savez(FLAGS.out.value, **flat)


def _task_worker():
    """One process of a multi-host `train_generator`: the run launch.py would do, plus a dump
    of this process's copy of the final generator parameters (to compare across processes)."""
    import jax
    import numpy as np

    config = FLAGS.config.value
    if config.cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", config.cpu_devices)
    from gencnp_jax.stages import pipeline
    from gencnp_jax.train import generator as train_generator

    pipeline.init_distributed(
        FLAGS.coordinator.value, FLAGS.num_processes.value, FLAGS.process_id.value
    )
    captured = {}
    make_train_step = train_generator.make_train_step

    def capturing_make_train_step(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step(*a):
            out = step_fn(*a)
            captured["state"], captured["step_fn"] = out[0], step_fn
            return out

        return step

    train_generator.make_train_step = capturing_make_train_step
    result = pipeline.run("train_generator", config, FLAGS.workdir.value)
    pid = jax.process_index()
    local = {}  # every local device's copy of every (replicated) parameter
    for path, leaf in jax.tree_util.tree_leaves_with_path(captured["state"].params):
        for j, shard in enumerate(leaf.addressable_shards):
            local[f"{j}|{jax.tree_util.keystr(path)}"] = np.asarray(shard.data)
    os.makedirs(FLAGS.out.value, exist_ok=True)
    np.savez(os.path.join(FLAGS.out.value, f"params_{pid}.npz"), **local)
    info = {
        "process_index": pid,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "compilations": captured["step_fn"]._cache_size(),
        "result": result,
    }
    with open(os.path.join(FLAGS.out.value, f"info_{pid}.json"), "w") as f:
        json.dump(info, f, default=float)
    print(f"process {pid}: done", flush=True)


def _task_load_data():
    """One process of N loading both splits, process 0 first (it prepares the TFDS files)."""
    import jax
    import numpy as np

    from gencnp_jax.context import inputs
    from gencnp_jax.io import sharding
    from gencnp_jax.stages import pipeline

    config = FLAGS.config.value
    pipeline.init_distributed(
        FLAGS.coordinator.value, FLAGS.num_processes.value, FLAGS.process_id.value
    )
    info = {}
    for split in ("train", "test"):
        arrays = sharding.process_0_first(
            lambda s=split: inputs.load_data(config, s), f"load_data/{split}"
        )
        info[split] = [len(arrays.labels), int(np.sum(arrays.images, dtype=np.int64))]
    os.makedirs(FLAGS.out.value, exist_ok=True)
    with open(os.path.join(FLAGS.out.value, f"data_{jax.process_index()}.json"), "w") as f:
        json.dump(info, f)


def start_workers(
    argv_common: list[str],
    num_processes: int,
    out_dir: str,
    log_dir: str,
    env: dict | None = None,
    task: str = "worker",
) -> list[subprocess.Popen]:
    """Starts `num_processes` processes of `task` on 127.0.0.1, with a free coordinator port
    (stdout and stderr to `log_dir/worker_I.log`)."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(num_processes):
        log = open(os.path.join(log_dir, f"worker_{pid}.log"), "w")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--task={task}",
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={pid}",
            f"--out={out_dir}",
            *argv_common,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=REPO,
            )
        )
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Waits for every process until `timeout` seconds in all; kills them all on timeout or on
    the first failure (a failed peer would leave the others blocked in a collective)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes
            if any(c not in (None, 0) for c in codes):
                time.sleep(2.0)  # let the peers report their side of the failure first
                return [p.poll() if p.poll() is not None else -9 for p in procs]
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _task_run():
    import numpy as np

    workdir = os.path.abspath(FLAGS.workdir.value)
    os.makedirs(workdir, exist_ok=True)
    overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
    subprocess.run(
        [sys.executable, launch, f"--workdir={workdir}", "--mode=train_classifier", *overrides],
        check=True,
    )
    out = os.path.join(workdir, "multihost_out")
    os.makedirs(out, exist_ok=True)
    procs = start_workers([f"--workdir={workdir}", *overrides], 2, out, out)
    codes = wait_all(procs, timeout=600)
    print("exit codes", codes)
    p0, p1 = (np.load(os.path.join(out, f"params_{i}.npz")) for i in range(2))
    worst = max(float(np.max(np.abs(p0[k] - p1[k]))) for k in p0.files)
    print(f"{len(p0.files)} arrays; max |process 0 - process 1| = {worst}")


def main(argv):
    del argv
    tasks = {
        "devices": _task_devices,
        "worker": _task_worker,
        "load_data": _task_load_data,
        "run": _task_run,
    }
    tasks[FLAGS.task.value]()


if __name__ == "__main__":
    FLAGS = _define_flags()
    app.run(main)
