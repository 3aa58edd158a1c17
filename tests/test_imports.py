"""The package's rooms and the one-way rule between them (docs/INTERNALS.md).

`models` imports nothing else of the package; `method` only `models`; `eval` only `method` and
`models`; `io` and `viz` nothing else; only `stages` sees the config (ml_collections). Every
import counts, at module level or inside a function, and the module graph has no cycle.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gencnp_jax"
ALLOWED = {
    "models": {"models"},
    "method": {"method", "models"},
    "eval": {"eval", "method", "models"},
    "io": {"io"},
    "viz": {"viz"},
    "stages": {"stages", "eval", "method", "models", "io", "viz"},
}


def _modules() -> dict[str, pathlib.Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
    }


def _imports(path: pathlib.Path) -> set[str]:
    """Every `gencnp_jax...` module (and `ml_collections`) that `path` imports, anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    modules = _modules()
    return {m for m in found if m in modules or m.split(".")[0] == "ml_collections"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_module_lives_in_a_room():
    loose = [m for m in _modules() if _room(m) is None and m != "gencnp_jax.__init__"]
    assert not loose, f"modules outside the role folders: {loose}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_one_way(module):
    room = _room(module)
    if room is None:
        return
    for target in _imports(_modules()[module]):
        if target.startswith("ml_collections"):
            assert room == "stages", f"{module} imports {target}: only stages/ read the config"
            continue
        target_room = _room(target)
        if target_room is None:  # a package itself, e.g. `from gencnp_jax.io import data`
            continue
        assert target_room in ALLOWED[room], f"{module} ({room}/) imports {target} ({target_room}/)"


def test_no_import_cycle():
    modules = _modules()
    graph = {m: {t for t in _imports(p) if t in modules and _room(t)} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, m, t]))
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
