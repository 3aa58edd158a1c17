"""gencnp_jax entry point: flags, optional multi-host start, one library call per mode.

python launch.py --config=configs/default.py --workdir=runs/default --mode=all

The flags and `main` live in `gencnp_jax/stages/cli.py` (also the `gencnp` console script).
"""

from gencnp_jax.stages.cli import main

if __name__ == "__main__":
    main()
