"""Runs the notebooks top to bottom in a fresh kernel, as a user would, and checks what they show.

Local mode (``GENCNP_NOTEBOOK_LOCAL=1``: no clone, no pip, no download) with no IDX files where
they look, so each notebook writes its synthetic set and runs the tiny config from scratch.
"""

import ast
import os
import sys

import jax
import nbformat
import pytest
from helpers import optimised_xla_flags
from nbclient import NotebookClient

import gencnp_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
# What a notebook may import besides the public `gencnp_jax` (the package itself excluded).
ALLOWED_IMPORTS = {"os", "sys", "json", "configs", "numpy", "jax", "optax", "flax", "IPython"}
ALLOWED_IMPORTS |= {"tensorflow_datasets"}  # the Colab download of Fashion-MNIST


def run_notebook(name: str, tmp_path, monkeypatch, **env) -> tuple[list, str]:
    """Executes notebooks/`name` in local mode; returns its code cells' outputs and stdout."""
    monkeypatch.setenv("GENCNP_NOTEBOOK_LOCAL", "1")
    monkeypatch.setenv("GENCNP_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("GENCNP_MANUAL_DIR", str(tmp_path / "no_idx_here"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if jax.config.jax_compilation_cache_dir:  # the session's XLA cache (conftest), if any
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    # A cell of our own first: the kernel must be this venv's python, not another one.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert outputs[0]["text"].strip() == sys.executable
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "local checkout:" in text and "wrote a synthetic set" in text
    assert os.path.exists(tmp_path / "run" / "report" / "index.html")
    return outputs, text


def _images(outputs) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "explain_your_model.ipynb"])
def test_notebook_uses_the_public_api_only(name):
    """Imports: `gencnp_jax` itself (names it exports), never its modules; a few libraries."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    lines = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()]
    magic = ("!", "%")  # IPython's shell and magic lines: a statement to the parser
    code = "\n".join(
        line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(magic) else line
        for line in lines
    )
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module]
        else:
            continue
        for module in modules:
            assert module == "gencnp_jax" or module.split(".")[0] in ALLOWED_IMPORTS, (
                f"{name} imports {module}: notebooks use the public API, `import gencnp_jax`"
            )
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "gencnp_jax"
    }
    assert used and used <= set(gencnp_jax.__all__), used - set(gencnp_jax.__all__)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook(
        "quickstart.ipynb", tmp_path, monkeypatch, XLA_FLAGS=optimised_xla_flags()
    )
    assert "Summary:" in text and "same prediction:" in text
    assert _images(outputs) >= 3  # pathway, density histogram, gallery (and the report's chart)


@pytest.mark.slow
def test_explain_your_model_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook(
        "explain_your_model.ipynb",
        tmp_path,
        monkeypatch,
        GENCNP_NOTEBOOK_STEPS="40",
        XLA_FLAGS=optimised_xla_flags(),
    )
    assert "all-ones gates give identical logits: True" in text
    assert "stages/1/act" in text  # list_sites printed the model's own module paths
    assert "step 40: loss" in text and "test accuracy" in text
    assert _images(outputs) == 3  # pathway, densities, Grad-CAM gallery
    run = tmp_path / "run"
    assert (run / "weights" / "small_net.npz").exists()
    assert '"factory": "__main__:build"' in (run / "config.json").read_text()
