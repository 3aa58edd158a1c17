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


def load_data(config, split: str) -> data.ArraySplit:
    """Loads a split as uint8 numpy arrays, capped by `data.{train,test}_limit`.

    Raises:
      data.DatasetError: files missing, images not of the dataset's shape, or labels out of
        range; the message says which split and how to fix it.
    """
    d = config.data
    # Process 0 prepares the TFDS folder first: two hosts renaming one folder collide.
    arrays = sharding.process_0_first(
        lambda: data.load_split(
            d.dataset, split, os.path.expanduser(d.data_dir), d.manual_dir or None
        ),
        f"load_data/{split}",
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
    limit = d.train_limit if split == "train" else d.test_limit
    if limit and limit < len(arrays.labels):
        arrays = dataclasses.replace(
            arrays, images=arrays.images[:limit], labels=arrays.labels[:limit]
        )
    return arrays


def normalize(config, images_uint8: np.ndarray) -> np.ndarray:
    return data.normalize(images_uint8, config.data.dataset)


def make_mesh(config) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.num_devices or None)


def num_classes(config) -> int:
    return data.dataset_info(config.data.dataset)[1]
