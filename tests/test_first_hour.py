"""A user's first hour with their own model, outside the repository (issue #26).

The venv that runs the suite (`bash setup.sh` makes it, the project installed into it) is the
user's: from a folder outside the repository, with PYTHONPATH unset, `import gencnp_jax`
works, `gencnp` exists beside the interpreter, the shipped configs load, and a user's model
module in the current folder is found by the console script.
"""

import os
import subprocess
import sys

from helpers import ROOT, run_launch

import gencnp_jax
from examples import fashion_cnn
from gencnp_jax.stages import cli

BIN = os.path.dirname(sys.executable)
GENCNP = os.path.join(BIN, "gencnp")
SETUP_HINT = "run `bash setup.sh` (it installs the project into .venv)"


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a user outside the repository: no PYTHONPATH, CPU only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_the_project_is_installed_in_the_venv(tmp_path):
    code = "import configs.tiny, gencnp_jax; print(gencnp_jax.__file__); print(configs.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{SETUP_HINT}\n{proc.stderr[-2000:]}"
    package, configs = proc.stdout.split()
    assert package == os.path.join(ROOT, "gencnp_jax", "__init__.py"), SETUP_HINT
    assert configs == os.path.join(ROOT, "configs", "__init__.py"), SETUP_HINT
    assert os.access(GENCNP, os.X_OK), f"no {GENCNP}: {SETUP_HINT}"


# --- list-valued fields on the command line ------------------------------------------------


def test_comma_separated_lists_become_tuples():
    argv = [
        "gencnp",
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        "--config.classifier.sites=act*,relu*",  # strings
        "--config.generator.model.pooling",  # the two-word form
        "avg,max",
        "--config.eval.ablations=zero",
        "--config.classifier.widths=8,16",  # numbers: already a tuple literal
        "--config.eval.densities=0.2",
        "--config.generator.loss.ranked_density=[0.1, 0.3]",
        "--config.classifier.sites=",  # empty
        "--config.seed=3",  # not a tuple
        "--config.data.dataset=npz:a,b",
    ]
    assert cli.list_overrides(argv) == [
        argv[0],
        argv[1],
        "--config.classifier.sites=('act*', 'relu*')",
        "--config.generator.model.pooling=('avg', 'max')",
        "--config.eval.ablations=('zero',)",
        "--config.classifier.widths=8,16",
        "--config.eval.densities=(0.2,)",
        "--config.generator.loss.ranked_density=[0.1, 0.3]",
        "--config.classifier.sites=()",
        "--config.seed=3",
        "--config.data.dataset=npz:a,b",
    ]
    assert cli.list_overrides(["gencnp", "--config=/no/such.py", "--config.x=a,b"]) == [
        "gencnp", "--config=/no/such.py", "--config.x=a,b"
    ]  # fmt: skip


def test_lists_through_launch_and_a_refused_run_leaves_no_folder(tiny_config, tmp_path):
    weights = gencnp_jax.save_weights(fashion_cnn.build(), str(tmp_path / "w.npz"))
    workdir = tmp_path / "new" / "run"
    proc = run_launch(
        tiny_config,
        str(workdir),
        "all",
        "--config.classifier.factory=examples.fashion_cnn:build",
        f"--config.classifier.checkpoint={weights}",
        "--config.generator.model.pooling=avg,max",  # each checked before the sites
        "--config.eval.ablations=zero,mean",
        "--config.eval.densities=0.1,0.2",
        "--config.classifier.sites=blocks/*/layers/2,blocks/*/relu",
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: config.classifier.sites=('blocks/*/layers/2', 'blocks/*/relu'): site pattern "
            "'blocks/*/relu' matches no submodule"
        )
    ), proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "new")  # nothing created, not even the parent
