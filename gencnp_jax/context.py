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

from gencnp_jax import checkpointing, classifiers, data, sharding


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
    """Loads a split as uint8 numpy arrays, capped by `data.{train,test}_limit`."""
    d = config.data
    arrays = data.load_split(d.dataset, split, os.path.expanduser(d.data_dir), d.manual_dir or None)
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


def classifier_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "classifier")


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
