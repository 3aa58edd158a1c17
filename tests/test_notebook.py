"""Runs notebooks/quickstart.ipynb top to bottom in a fresh kernel, as a user would.

Local mode (``GENCNP_NOTEBOOK_LOCAL=1``: no clone, no pip) with no IDX files where it looks,
so the notebook writes its synthetic set and trains the tiny config from scratch.
"""

import os
import sys

import jax
import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCNP_NOTEBOOK_LOCAL", "1")
    monkeypatch.setenv("GENCNP_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("GENCNP_MANUAL_DIR", str(tmp_path / "no_idx_here"))
    if jax.config.jax_compilation_cache_dir:  # the session's XLA cache (conftest), if any
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A cell of our own first: the kernel must be this venv's python, not another one.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails

    streams = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert streams[0]["text"].strip() == sys.executable
    assert not [o for o in streams if o["output_type"] == "error"]
    text = "".join(o.get("text", "") for o in streams if o["output_type"] == "stream")
    assert "local checkout:" in text and "wrote a synthetic set" in text
    images = [o for o in streams if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # pathway, density histogram, gallery (and the baselines chart)
    assert os.path.exists(tmp_path / "run" / "report" / "index.html")
