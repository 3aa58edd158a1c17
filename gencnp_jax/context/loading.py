"""The models of a run as its config names them: the classifier (built-in, or the user's own
model of `context/user_model.py`) and the generator, fresh or restored from the workdir.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.context import user_model
from gencnp_jax.io import checkpointing, data
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers, generator


@dataclasses.dataclass
class Classifier:
    """A trained (or fresh) classifier as it crosses jit: `(graphdef, state)`; `graphdef` is
    a built-in model's NNX GraphDef or a user's model gated by `attach` (`classifiers.forward`
    runs either)."""

    graphdef: classifiers.Definition
    state: nnx.State
    site_channels: dict[str, int]
    num_classes: int


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


def _restore_classifier(workdir: str, template):
    ckpt = checkpointing.Checkpointer(os.path.join(classifier_dir(workdir), "final"))
    restored = ckpt.restore(template)
    ckpt.close()
    if restored is None:
        raise workdir_lib.StageOrderError(
            f"no trained classifier in {classifier_dir(workdir)}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_classifier` first"
        )
    return restored[1]


def load_classifier(config, workdir: str) -> Classifier:
    """The trained (or, for a factory model, imported) classifier of `workdir` (an error
    naming the missing stage if absent)."""
    if user_model.uses_factory(config):
        hwc, num_classes = data.dataset_info(config.data.dataset)
        gated = user_model.build_gated(config, hwc, num_classes, load_weights=False)
        saved = _restore_classifier(workdir, {"state": user_model.saved_part(gated.state)})
        gated = user_model.with_saved(gated, saved["state"])
        return Classifier(gated, gated.state, dict(gated.site_channels), num_classes)
    model, template = classifier_template(config, abstract=True)
    state = _restore_classifier(workdir, template)
    model = nnx.merge(nnx.graphdef(model), state["params"], state["rest"])
    graphdef, full_state = nnx.split(model)
    _, num_classes = data.dataset_info(config.data.dataset)
    return Classifier(graphdef, full_state, dict(model.site_channels), num_classes)


def new_generator(config, site_channels, num_classes) -> generator.Generator:
    model = config.generator.model.to_dict()
    model["pooling"] = tuple(model["pooling"])
    return generator.Generator(site_channels, num_classes, **model, rngs=nnx.Rngs(config.seed + 1))


def load_generator(config, workdir: str, classifier: Classifier):
    """`(graphdef, state, fills, means)` of the trained generator of `workdir`.

    `means` are the training-set channel means; `fills` is `means` under mean ablation,
    else None (zero ablation).

    Raises:
      workdir_lib.StageOrderError: no trained generator in `workdir`.
    """
    model = nnx.eval_shape(
        lambda: new_generator(config, classifier.site_channels, classifier.num_classes)
    )  # shapes only: restoring needs no real initial weights
    graphdef, state = nnx.split(model)
    fills = {
        s: jax.ShapeDtypeStruct((c,), jnp.float32) for s, c in classifier.site_channels.items()
    }
    folder = workdir_lib.generator_dir(workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(folder, "final"))
    restored = ckpt.restore({"generator": state, "means": fills})
    ckpt.close()
    if restored is None:
        raise workdir_lib.StageOrderError(
            f"no trained generator in {folder}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_generator` first"
        )
    _, tree, _ = restored
    fills = tree["means"] if config.generator.ablation == "mean" else None
    return graphdef, tree["generator"], fills, tree["means"]
