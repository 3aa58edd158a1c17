"""What several test files share: the default hyper-parameters of small components, and
launch.py in a subprocess (the end-to-end tests of resume, bad input and reproducibility).

Subprocesses run the tiny config on the session's synthetic data, one CPU device, the suite's
XLA cache; every process has a timeout and is killed when a test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax

from configs import default
from gencnp_jax.context import loading


def generator_kwargs(**overrides) -> dict:
    """`Generator`'s hyper-parameters as `configs/default.py` sets them, with `overrides`."""
    config = default.get_config()
    model = config.generator.model.to_dict()
    model["pooling"] = tuple(model["pooling"])
    model["rank_head"] = loading.has_rank_head(config)  # as context.loading builds it
    return {**model, **overrides}


# A small generator for unit tests, reading features alone with one head (test_generator.py
# tests the first-order effects and the rank head).
GENERATOR = generator_kwargs(hidden=16, grad_evidence=False, rank_head=False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step dir once it is complete


def launch_cmd(config, workdir: str, mode: str, *overrides: str) -> list[str]:
    """The command line of `launch.py` on configs/tiny.py with `config`'s data folders."""
    return [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        f"--workdir={workdir}",
        f"--mode={mode}",
        f"--config.data.manual_dir={config.data.manual_dir}",
        f"--config.data.data_dir={config.data.data_dir}",
        "--config.cpu_devices=1",
        *overrides,
    ]


def optimised_xla_flags() -> str:
    """This process's XLA_FLAGS without the suite's optimisation level (conftest.py).

    Compiling without LLVM optimisations saves time where compiling dominates, but a whole
    pipeline's gradient passes then run far slower: on the imported CNN of
    `test_user_model.py`, IntGrad's pass on 32 images took 10 s instead of 0.14 s. The
    end-to-end runs of a pipeline in another process compile with XLA's default.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if not f.startswith("--xla_backend_optimization_level"))


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment plus the suite's persistent XLA cache (if any)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_launch(
    config, workdir: str, mode: str, *overrides: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """Runs launch.py to the end (killed after `timeout` s); stdout and stderr as text."""
    return subprocess.run(
        launch_cmd(config, workdir, mode, *overrides),
        cwd=ROOT,
        env=launch_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def committed_steps(ckpt_dir: str) -> list[int]:
    """Steps of `ckpt_dir` whose orbax commit marker exists (half-written ones are left out)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(ckpt_dir)
        if name.isdigit() and os.path.exists(os.path.join(ckpt_dir, name, COMMIT_MARKER))
    )


def kill_when(config, workdir: str, mode: str, ready, *overrides: str, timeout: float = 300) -> str:
    """Starts launch.py and SIGKILLs it as soon as `ready()` is true (polled every 10 ms).

    Returns:
      The killed process's output (for failure messages).
    """
    log_path = os.path.join(os.path.dirname(os.path.abspath(workdir)), f"killed_{mode}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            launch_cmd(config, workdir, mode, *overrides),
            cwd=ROOT,
            env=launch_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, f"{mode} ended (rc={proc.returncode}) before the kill"
                assert time.monotonic() < deadline, f"not ready to kill after {timeout} s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    with open(log_path) as f:
        output = f.read()
    assert proc.returncode == -signal.SIGKILL, f"rc={proc.returncode}\n{output[-3000:]}"
    return output
