"""A user's first hour with their own model, outside the repository (issue #26).

The venv that runs the suite (`bash setup.sh` makes it, the project installed into it) is the
user's: from a folder outside the repository, with PYTHONPATH unset, `import gencnp_jax`
works, `gencnp` exists beside the interpreter, the shipped configs load, and a user's model
module in the current folder is found by the console script.
"""

import os
import subprocess
import sys

from helpers import ROOT

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
