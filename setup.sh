#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian-like machine: the Fashion-MNIST files, a venv, and the
# project installed into it (editable).
# Re-running it is quick: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")"

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Debian package dataset-fashion-mnist (real Fashion-MNIST IDX files)"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: no apt-get here. Put the four Fashion-MNIST IDX files (train/t10k images and" >&2
    echo "labels, .gz or not) in a folder and pass --config.data.manual_dir=/that/folder." >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
STAMP=.venv/.requirements.sha256
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing Python requirements into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$WANT" > "$STAMP"
fi
# The project itself, editable: `import gencnp_jax` (and the shipped `configs`) from any
# directory, and the `.venv/bin/gencnp` command. --no-deps: the pins above stay as they are.
# Redone only when pyproject.toml (or this checkout's place) changes.
PROJECT_STAMP=.venv/.project.sha256
WANT_PROJECT=$( (cat pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$PROJECT_STAMP" 2>/dev/null)" != "$WANT_PROJECT" ] || [ ! -x .venv/bin/gencnp ]; then
  echo "setup: installing the project into .venv (pip install --no-deps -e .)"
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$WANT_PROJECT" > "$PROJECT_STAMP"
fi
echo "setup: ready"
