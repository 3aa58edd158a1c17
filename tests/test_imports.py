"""The package's rooms and the one-way rule between them (docs/INTERNALS.md).

The lower floors: `models` imports nothing else of the package; `method` only `models`; `eval`
only `method` and `models`; `io` and `viz` nothing else. Above them, the rooms that read the
config (ml_collections): `context` (config -> data, mesh, models), `train` (the trainers: never
the stages, never the explainer), the library-level `explainer`, `tools` (bench, headroom) and
`stages` (dispatch, evaluation, report). Every import counts, at module level or inside a
function, and the module graph has no cycle.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gencnp_jax"
LOWER = {"models", "method", "eval", "io"}
ALLOWED = {
    "models": {"models"},
    "method": {"method", "models"},
    "eval": {"eval", "method", "models"},
    "io": {"io"},
    "viz": {"viz"},
    "context": {"context", *LOWER},
    "train": {"train", "context", *LOWER},
    "explainer": {"context", *LOWER},
    "tools": {"tools", "explainer", "stages", "train", "context", *LOWER},
    "stages": {"stages", "explainer", "train", "context", "viz", *LOWER},
}
READS_CONFIG = {"context", "train", "explainer", "tools", "stages"}
TOP_LEVEL = {"gencnp_jax.__init__", "gencnp_jax.explainer"}  # the library-level modules


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
    if module == "gencnp_jax.explainer":
        return "explainer"
    return parts[1] if len(parts) > 2 else None


def test_every_module_lives_in_a_room():
    loose = [m for m in _modules() if _room(m) is None and m not in TOP_LEVEL]
    assert not loose, f"modules outside the role folders: {loose}"


def test_every_room_has_a_rule():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms == set(ALLOWED), rooms ^ set(ALLOWED)


def test_trainers_never_import_stages_or_the_explainer():
    for module, path in _modules().items():
        if _room(module) != "train":
            continue
        bad = {t for t in _imports(path) if _room(t) in ("stages", "explainer", "tools")}
        assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_one_way(module):
    room = _room(module)
    if room is None:
        return
    for target in _imports(_modules()[module]):
        if target.startswith("ml_collections"):
            assert room in READS_CONFIG, (
                f"{module} imports {target}: {room}/ never reads the config"
            )
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
