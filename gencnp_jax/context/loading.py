"""The models of a run as its config names them: the classifier (built-in, or the user's own
model of `context/user_model.py`) and the generator, fresh or restored from the workdir.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.context import user_model
from gencnp_jax.io import checkpointing, data
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers, generator
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator


def new_classifier(config, num_classes: int, in_channels: int) -> nnx.Module:
    c = config.classifier
    return classifiers.make_classifier(
        c.name, tuple(c.widths), num_classes, in_channels, c.depth, seed=config.seed
    )


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
    ckpt = checkpointing.Checkpointer(os.path.join(workdir_lib.classifier_dir(workdir), "final"))
    restored = ckpt.restore(template)
    ckpt.close()
    if restored is None:
        raise workdir_lib.StageOrderError(
            f"no trained classifier in {workdir_lib.classifier_dir(workdir)}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_classifier` first"
        )
    return restored[1]


def load_classifier(config, workdir: str) -> FrozenClassifier:
    """The trained (or, for a factory model, imported) classifier of `workdir`, without
    fills (zero ablation: `load_generator` gives the run's); an error naming the missing
    stage if absent."""
    if user_model.uses_factory(config):
        hwc, num_classes = data.dataset_info(config.data.dataset)
        gated = user_model.build_gated(config, hwc, num_classes, load_weights=False)
        saved = _restore_classifier(workdir, {"state": user_model.saved_part(gated.state)})
        gated = user_model.with_saved(gated, saved["state"])
        return FrozenClassifier(gated, gated.state, gated.site_channels, num_classes)
    model, template = classifier_template(config, abstract=True)
    state = _restore_classifier(workdir, template)
    model = nnx.merge(nnx.graphdef(model), state["params"], state["rest"])
    graphdef, full_state = nnx.split(model)
    _, num_classes = data.dataset_info(config.data.dataset)
    return FrozenClassifier(graphdef, full_state, model.site_channels, num_classes)


def distils_pio_targets(config) -> bool:
    """Whether the generator learns from PIO targets (a distillation weight and some images)."""
    g = config.generator
    return g.loss.w_distill > 0 and g.pio.num_images > 0


def has_rank_head(config) -> bool:
    """Whether the generator has a rank head: the rank term trains it on the PIO targets, so
    both are needed (without them the gate logits rank)."""
    return config.generator.loss.w_rank > 0 and distils_pio_targets(config)


def new_generator(config, site_channels, num_classes) -> generator.Generator:
    model = config.generator.model.to_dict()
    model["pooling"] = tuple(model["pooling"])
    rank_head = has_rank_head(config)
    return generator.Generator(
        site_channels, num_classes, **model, rank_head=rank_head, rngs=nnx.Rngs(config.seed + 1)
    )


def load_generator(
    config, workdir: str, classifier: FrozenClassifier
) -> tuple[FrozenGenerator, FrozenClassifier, dict]:
    """The trained generator of `workdir`, with the classifier it explains.

    Returns:
      ``(generator, classifier, means)``: `classifier` with the run's fills (the
      training-set channel `means` under mean ablation, none under zero ablation) and the
      means themselves (what mean ablation would take, whatever the run's).

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
    return FrozenGenerator(graphdef, tree["generator"]), classifier.with_fills(fills), tree["means"]
