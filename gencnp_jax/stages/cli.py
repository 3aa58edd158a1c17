"""The command line: flags, optional multi-host start, one library call per mode.

gencnp --config=configs/default.py --workdir=runs/default --mode=all
(the `gencnp` console script of pyproject.toml; `python launch.py ...` runs the same `main`)
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gencnp_jax.stages import modes

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", lock_config=True)
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


def main():
    """The console-script entry point: parses the command line and runs `run`."""
    # `--help` lists the key flags of the program's main module (sys.argv[0]): make ours key
    # there too, whether the program is launch.py, the `gencnp` script or `python -m`.
    for holder in _FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
    app.run(run)


if __name__ == "__main__":
    main()
