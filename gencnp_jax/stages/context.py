"""What every stage needs, built from the config: data splits, mesh, the classifier.

The only place (with the stage loops) that reads the config; the library below
it takes plain values.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax.io import batched, checkpointing, data, sharding
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers
from gencnp_jax.models.gating import GatedClassifier
from gencnp_jax.stages import user_classifier


class StageOrderError(RuntimeError):
    """A stage was run before the stage it needs."""


@dataclasses.dataclass
class Classifier:
    """A trained (or fresh) classifier as it crosses jit: `(graphdef, state)`; `graphdef` is
    a built-in model's NNX GraphDef or a user's model gated by `attach` (`classifiers.forward`
    runs either)."""

    graphdef: classifiers.Definition
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


def num_classes(config) -> int:
    return data.dataset_info(config.data.dataset)[1]


def classifier_template(config, abstract: bool = False) -> tuple[nnx.Module, dict]:
    """A fresh model and the train-state pytree its checkpoints have.

    `abstract` builds shapes only (`nnx.eval_shape`): enough to restore into, and free.
    """
    hwc, num_classes = data.dataset_info(config.data.dataset)
    build = lambda: new_classifier(config, num_classes, hwc[-1])
    model = nnx.eval_shape(build) if abstract else build()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return model, {"params": params, "rest": rest}


def _restore_classifier(workdir: str, template):
    ckpt = checkpointing.Checkpointer(os.path.join(classifier_dir(workdir), "final"))
    restored = ckpt.restore(template)
    ckpt.close()
    if restored is None:
        raise StageOrderError(
            f"no trained classifier in {classifier_dir(workdir)}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_classifier` first"
        )
    return restored[1]


def load_classifier(config, workdir: str) -> Classifier:
    """The trained (or, for a factory model, imported) classifier of `workdir` (an error
    naming the missing stage if absent)."""
    if user_classifier.uses_factory(config):
        hwc, num_classes = data.dataset_info(config.data.dataset)
        gated = user_classifier.build_gated(config, hwc, num_classes, load_weights=False)
        saved = _restore_classifier(workdir, {"state": user_classifier.saved_part(gated.state)})
        gated = user_classifier.with_saved(gated, saved["state"])
        return Classifier(gated, gated.state, dict(gated.site_channels), num_classes)
    model, template = classifier_template(config, abstract=True)
    state = _restore_classifier(workdir, template)
    model = nnx.merge(nnx.graphdef(model), state["params"], state["rest"])
    graphdef, full_state = nnx.split(model)
    _, num_classes = data.dataset_info(config.data.dataset)
    return Classifier(graphdef, full_state, dict(model.site_channels), num_classes)


class _Probe(nnx.Module):
    """Stands in for a BatchNorm: records its input, then normalises in inference mode."""

    def __init__(self, bn: nnx.BatchNorm, record):
        self.bn, self.record = bn, record

    def __call__(self, x, use_running_average=None, **kwargs):
        self.record(x)
        return self.bn(x, use_running_average=True, **kwargs)


def _batchnorm_paths(model: nnx.Module) -> list[tuple]:
    return [path for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def _nnx_model(graphdef) -> tuple[nnx.GraphDef, object] | None:
    """``(NNX graphdef, call(model, x))`` of a built-in or attached NNX classifier (None for
    an attached Linen model, whose BatchNorms are not NNX modules)."""
    if isinstance(graphdef, GatedClassifier):
        if graphdef.call_model is None:
            return None
        return graphdef.graphdef, graphdef.call_model
    return graphdef, lambda model, x: model(x, train=False)


def _probed_moments(graphdef, state: nnx.State, images_BxHxWxC, order=None):
    """Per-example mean and variance (over every axis but batch and channel) of each
    BatchNorm's input in inference mode: ``[{"mean": f32[B, C], "var": f32[B, C]}]`` in call
    order; the BatchNorms' module paths are appended to `order` (a list) when given."""
    nnx_graphdef, call = _nnx_model(graphdef)
    model = nnx.merge(nnx_graphdef, state)
    seen = []
    for path in _batchnorm_paths(model):
        parent, key = _module_at(model, path[:-1]), path[-1]
        probe = _Probe(_child(parent, key), lambda x, p=path: seen.append((p, x)))
        if isinstance(key, int):
            parent[key] = probe
        else:
            setattr(parent, key, probe)
    call(model, images_BxHxWxC)
    if order is not None:
        order.extend(p for p, _ in seen)
    axes = lambda x: tuple(range(1, x.ndim - 1))
    return [{"mean": x.mean(axes(x)), "var": x.var(axes(x))} for _, x in seen]


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
    for key in path:
        model = _child(model, key)
    return model


def reestimate_batchnorm(
    graphdef: classifiers.Definition,
    state: nnx.State,
    make_batch,
    num_examples: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> nnx.State:
    """`state` with every BatchNorm's running mean and variance set to the exact population
    statistics of its input over examples ``0..num_examples-1``, in inference mode.

    The BatchNorms are re-estimated one at a time in call order, each after those before it
    (its input depends on their statistics), so afterwards each one's input, with the model
    in inference mode and every gate open, has exactly its running mean and (biased)
    variance. Per example: the mean and variance over its positions (`batched.map_batches`,
    padded rows dropped); the population variance is the mean of those variances plus the
    variance of those means (every example has the same number of positions).

    Args:
      make_batch: ``indices int64[n] -> f32[n, H, W, C]`` normalised images of those rows.
      batch_size: rows per pass; a multiple of the mesh size.

    Returns:
      The new state (the input is not changed); non-BatchNorm variables are kept. An
      attached Linen model's state is returned as it is.
    """
    if _nnx_model(graphdef) is None:  # attached Linen model: its statistics are kept
        return state
    order = []
    example = jnp.asarray(make_batch(np.zeros(1, np.int64)))
    jax.eval_shape(lambda s, x: _probed_moments(graphdef, s, x, order), state, example)
    probe = jax.jit(lambda s, x: _probed_moments(graphdef, s, x))  # one compilation
    for layer, path in enumerate(order):
        state_dev = sharding.replicate(mesh, state)
        run = lambda x, s=state_dev, i=layer: probe(s, x)[i]
        moments = batched.map_batches(run, make_batch, num_examples, batch_size, mesh)
        mean_BxC = moments["mean"].astype(np.float64)  # exact sums over the whole split
        var_C = moments["var"].astype(np.float64).mean(0) + mean_BxC.var(0)
        model = nnx.merge(_nnx_model(graphdef)[0], state, copy=True)  # caller's state kept
        bn = _module_at(model, path)
        bn.mean.set_value(jnp.asarray(mean_BxC.mean(0), bn.mean.get_value().dtype))
        bn.var.set_value(jnp.asarray(var_C, bn.var.get_value().dtype))
        state = nnx.state(model)
    return state
