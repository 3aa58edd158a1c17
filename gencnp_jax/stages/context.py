"""What every stage needs, built from the config: data splits, mesh, the classifier.

The only place (with the stage loops) that reads the config; the library below
it takes plain values.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from gencnp_jax.io import checkpointing, data, sharding
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers


class StageOrderError(RuntimeError):
    """A stage was run before the stage it needs."""


@dataclasses.dataclass
class Classifier:
    """A trained (or fresh) classifier as it crosses jit: `(graphdef, state)`."""

    graphdef: nnx.GraphDef
    state: nnx.State
    site_channels: dict[str, int]
    num_classes: int


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


def new_classifier(config, num_classes: int, in_channels: int) -> nnx.Module:
    c = config.classifier
    return classifiers.make_classifier(
        c.name, tuple(c.widths), num_classes, in_channels, c.depth, seed=config.seed
    )


classifier_dir = workdir_lib.classifier_dir


def classifier_template(config, abstract: bool = False) -> tuple[nnx.Module, dict]:
    """A fresh model and the train-state pytree its checkpoints have.

    `abstract` builds shapes only (`nnx.eval_shape`): enough to restore into, and free.
    """
    hwc, num_classes = data.dataset_info(config.data.dataset)
    build = lambda: new_classifier(config, num_classes, hwc[-1])
    model = nnx.eval_shape(build) if abstract else build()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return model, {"params": params, "rest": rest}


def load_classifier(config, workdir: str) -> Classifier:
    """The trained classifier of `workdir` (error naming the missing stage if absent)."""
    model, template = classifier_template(config, abstract=True)
    ckpt = checkpointing.Checkpointer(os.path.join(classifier_dir(workdir), "final"))
    restored = ckpt.restore(template)
    ckpt.close()
    if restored is None:
        raise StageOrderError(
            f"no trained classifier in {classifier_dir(workdir)}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_classifier` first"
        )
    _, state, _ = restored
    model = nnx.merge(nnx.graphdef(model), state["params"], state["rest"])
    graphdef, full_state = nnx.split(model)
    _, num_classes = data.dataset_info(config.data.dataset)
    return Classifier(graphdef, full_state, dict(model.site_channels), num_classes)
