"""Shared fixtures: the tiny config on a synthetic IDX set, and one trained tiny run.

The classifier (and the generator) are trained once per test session and reused. On two CPU
cores compiling dominates the suite's time, so XLA programs are cached on disk in pytest's
cache dir (`pytest --cache-clear` empties it) and compiled without LLVM optimisations (same
IEEE semantics, about 40% less CPU time; an `xla_backend_optimization_level` in XLA_FLAGS
wins).
"""

import gzip
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from gencnp_jax.io import workdir as workdir_lib

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts its backend; subprocesses of the tests inherit it, except the
    # whole-pipeline runs that ask for `helpers.optimised_xla_flags()`.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end test (deselect with -m 'not slow')")
    cache = getattr(config, "cache", None)  # absent under `-p no:cacheprovider`
    if cache is not None and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache_dir = cache.mkdir("jax_compilation_cache")
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


NUM_TRAIN, NUM_TEST = 576, 128  # tiny.py's train_limit (512 train + 64 validation), test_limit


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 + array.ndim  # uint8 data, `ndim` dimensions
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 images whose class is visible: class k has a bright 6x6 square at a
    position set by k (two rows of five), over uniform noise."""
    images = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        top, left = 2 + (k // 5) * 14, 1 + (k % 5) * 5
        images[i, top : top + 6, left : left + 6] = rng.integers(200, 256, (6, 6))
    return images


def write_idx_set(folder: str, seed: int = 0) -> None:
    """Writes gzipped IDX files under the Fashion-MNIST names (see fashion_mnist_local)."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = synthetic_images(labels, rng)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(_idx_bytes(array))


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("idx"))
    write_idx_set(folder)
    return folder


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def make_tiny_config(idx_dir: str, tfds_dir: str):
    """configs/tiny.py, unlocked, reading the synthetic IDX set."""
    config = tiny.get_config()
    config.data.manual_dir = idx_dir
    config.data.data_dir = tfds_dir
    return config


@pytest.fixture(scope="session")
def tiny_config(idx_dir, tfds_dir):
    """configs/tiny.py on the synthetic set, shared by the session: `copy.deepcopy` it before
    changing a field."""
    return make_tiny_config(idx_dir, tfds_dir)


@pytest.fixture(scope="session")
def trained_workdir(idx_dir, tfds_dir, tmp_path_factory) -> str:
    """A workdir holding a trained tiny classifier (trained once per session, from a config
    of its own: what a test does to `tiny_config` cannot change it)."""
    from gencnp_jax.train import classifier as train_classifier

    workdir = str(tmp_path_factory.mktemp("classifier_run"))
    train_classifier.train_classifier(make_tiny_config(idx_dir, tfds_dir), workdir)
    return workdir


@pytest.fixture(scope="session")
def generator_workdir(idx_dir, tfds_dir, trained_workdir, tmp_path_factory) -> str:
    """A copy of `trained_workdir` with a trained tiny generator added (once per session);
    `trained_workdir` itself keeps no generator."""
    from gencnp_jax.train import generator as train_generator

    workdir = str(tmp_path_factory.mktemp("generator_run"))
    shutil.copytree(
        workdir_lib.classifier_dir(trained_workdir), workdir_lib.classifier_dir(workdir)
    )
    train_generator.train_generator(make_tiny_config(idx_dir, tfds_dir), workdir)
    return workdir
