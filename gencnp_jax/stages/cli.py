"""The command line: flags, optional multi-host start, one library call per mode.

gencnp --config=configs/default.py --workdir=runs/default --mode=all
(the `gencnp` console script of pyproject.toml; `python launch.py ...` runs the same `main`)

A tuple-valued field takes a comma-separated list: ``--config.classifier.sites=act*,relu*``,
``--config.eval.densities=0.1,0.2`` (`list_overrides`); the tuple literal
``--config.classifier.sites="('act*', 'relu*')"`` works too.
"""

import ast
import importlib.util
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from gencnp_jax.stages import modes

# The repository's default config; outside it, the installed copy (setup.sh installs configs).
_DEFAULT_CONFIG = "configs/default.py"
if not os.path.isfile(_DEFAULT_CONFIG):
    _DEFAULT_CONFIG = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        _DEFAULT_CONFIG,
    )
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum(
    "mode",
    "all",
    list(modes.NAMES),
    "Which stage to run; `all` runs every stage, skipping those already complete.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["workdir"])
_FLAGS = (_CONFIG, _WORKDIR, _MODE, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)


def run(argv):
    """Runs `--mode` on `--config` in `--workdir` (the flags are parsed by `absl.app.run`)."""
    del argv
    logging.set_verbosity(logging.WARNING)  # absl INFO lines (e.g. 'no TPU backend') are noise
    import jax

    if _CONFIG.value.cpu_devices > 0:  # host devices: a 2-device CPU mesh uses both cores
        jax.config.update("jax_num_cpu_devices", _CONFIG.value.cpu_devices)
    from gencnp_jax.stages import pipeline

    pipeline.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    pipeline.run(_MODE.value, _CONFIG.value, _WORKDIR.value)


def _config_path(argv: list[str]) -> str:
    """The config file `argv` names (``--config=PATH`` or ``--config PATH``), else the default."""
    path = _DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def _load_config(path: str):
    """``get_config()`` of the config file `path` (``FILE[:ARG]``), as the flags parser calls it."""
    file, sep, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_gencnp_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _field(config, dotted: str):
    """The value of the field at `dotted` in `config`; None if there is none."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _as_tuple(text: str, default: tuple) -> str:
    """``"a,b"`` -> ``"('a', 'b')"``: the elements numbers where the default's are (or, for an
    empty default, where they parse as numbers), else strings; ``""`` -> ``"()"``."""
    strings = bool(default) and all(isinstance(v, str) for v in default)
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        value = piece
        if not strings:
            try:
                value = ast.literal_eval(piece)
            except (ValueError, SyntaxError):
                value = piece
            if isinstance(value, bool) or not isinstance(value, int | float):
                value = piece
        values.append(value)
    return repr(tuple(values))


def list_overrides(argv: list[str]) -> list[str]:
    """`argv` with each ``--config.X=a,b`` of a tuple-valued field X (in the config `argv`
    names) written as the tuple literal ml_collections parses, ``--config.X=('a', 'b')``.

    Values already written as a tuple or list (``(...)``, ``[...]``), or that parse as one
    (``0.1,0.2``), pass unchanged, as does everything when the config does not load (the
    flags parser then reports it).
    """
    try:
        config = _load_config(_config_path(argv))
    except Exception:  # the flags parser reports it, with its own message
        return list(argv)
    if not isinstance(config, ml_collections.ConfigDict):
        return list(argv)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out.extend(argv[i - 1 :])
            break
        if not arg.startswith("--config."):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if not eq and i < len(argv) and not argv[i].startswith("-"):
            value = argv[i]  # the two-word form: --config.X VALUE
            i += 1
        elif not eq:
            out.append(arg)
            continue
        default = _field(config, name[len("--config.") :])
        if isinstance(default, tuple | list) and not value.strip().startswith(("(", "[")):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = None
            if not isinstance(parsed, tuple | list):
                value = _as_tuple(value, tuple(default))
        out.append(f"{name}={value}")
    return out


def main():
    """The console-script entry point: parses the command line and runs `run`."""
    sys.argv = list_overrides(sys.argv)
    # `--help` lists the key flags of the program's main module (sys.argv[0]): make ours key
    # there too, whether the program is launch.py, the `gencnp` script or `python -m`.
    for holder in _FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
    app.run(run)


if __name__ == "__main__":
    main()
