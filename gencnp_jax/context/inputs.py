"""The run's data and devices as its config names them: splits, normalisation, the mesh.

The rest of the package takes plain arrays; this module (with the rest of `context/`) turns
`config.data` and `config.num_devices` into them.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from gencnp_jax.io import data, sharding

SPLITS = ("train", "validation", "test")


def split_rows(num_train: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, validation_rows)``: the dataset's training split cut in two, disjoint,
    sorted, by a seeded permutation (`seed` the run's): the validation rows are the first
    `validation_size` of it, every other row trains."""
    permutation = np.random.default_rng(seed + 2027).permutation(num_train)
    size = min(validation_size, num_train)
    return np.sort(permutation[size:]), np.sort(permutation[:size])


def load_data(config, split: str) -> data.ArraySplit:
    """Loads a split as uint8 numpy arrays: ``"train"``, ``"validation"`` or ``"test"``.

    The dataset's training split, capped by `data.train_limit`, is cut into the run's
    training rows and ``data.validation_size`` validation rows (`split_rows`): nothing the run
    trains (classifier, generator, its targets, the controls' means) sees a validation image;
    every choice is made on them, the test split only reports. `data.test_limit` caps the test
    split.

    Raises:
      data.DatasetError: files missing, images not of the dataset's shape, or labels out of
        range; the message says which split and how to fix it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    d = config.data
    source = "test" if split == "test" else "train"
    # Process 0 prepares the TFDS folder first: two hosts renaming one folder collide.
    arrays = sharding.process_0_first(
        lambda: data.load_split(
            d.dataset, source, os.path.expanduser(d.data_dir), d.manual_dir or None
        ),
        f"load_data/{source}",
    )
    hwc, num_classes = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
    where = f"split {split!r} of {d.dataset!r} (config.data.data_dir={d.data_dir!r})"
    if tuple(arrays.images.shape[1:]) != tuple(hwc):
        raise data.DatasetError(
            f"{where}: images are {arrays.images.shape[1:]}, the classifier is built for "
            f"{tuple(hwc)}: rebuild the prepared dataset from correct files"
        )
    try:
        data.validate_labels(arrays.labels, num_classes)
    except ValueError as err:
        raise data.DatasetError(
            f"{where}: {err}: rebuild the prepared dataset from correct label files"
        ) from None
    limit = d.test_limit if split == "test" else d.train_limit
    if limit and limit < len(arrays.labels):
        arrays = dataclasses.replace(
            arrays, images=arrays.images[:limit], labels=arrays.labels[:limit]
        )
    if split == "test":
        return arrays
    train_rows, validation_rows = split_rows(len(arrays.labels), d.validation_size, config.seed)
    rows = train_rows if split == "train" else validation_rows
    return dataclasses.replace(
        arrays, images=arrays.images[rows], labels=arrays.labels[rows], name=split
    )


def split_sizes(config) -> dict[str, int]:
    """Images in each of the run's splits, ``{"train": n, "validation": n, "test": n}``, as
    `load_data` gives them (which checks their files, shapes and labels).

    Raises:
      data.DatasetError: see `load_data`.
    """
    return {split: len(load_data(config, split).labels) for split in SPLITS}


def normalize(config, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> the classifier's float input, as ``config.data.normalization`` says."""
    return data.normalize(images_uint8, config.data.dataset, config.data.normalization)


def describe_normalization(config) -> str:
    """What `normalize` does, in words: ``"(x/255 - (0.286,)) / (0.353,) (config.data.
    normalization='dataset')"``, or ``"x/255 (config.data.normalization='none')"``."""
    d = config.data
    mean, std = (
        tuple(float(f"{v:.4g}") for v in t)
        for t in data.normalization_stats(d.dataset, d.normalization)
    )
    plain = all(m == 0 for m in mean) and all(s == 1 for s in std)
    how = "x/255" if plain else f"(x/255 - {mean}) / {std}"
    return f"{how} (config.data.normalization={d.normalization!r})"


def make_mesh(config) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.num_devices or None)


def num_classes(config) -> int:
    return data.dataset_info(config.data.dataset)[1]
