"""A trained classifier and generator from a workdir, ready to explain images (notebooks).

explainer = Explainer.from_workdir(config, "runs/default")
pathway = explainer(images_uint8)        # Pathway: gates, scores, logits
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax.io import checkpointing, data
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method.explain import jit_explain
from gencnp_jax.method.pathway import Pathway
from gencnp_jax.models import generator
from gencnp_jax.stages import context


def new_generator(config, site_channels, num_classes) -> generator.Generator:
    model = config.generator.model.to_dict()
    model["pooling"] = tuple(model["pooling"])
    return generator.Generator(site_channels, num_classes, **model, rngs=nnx.Rngs(config.seed + 1))


generator_dir = workdir_lib.generator_dir


def load_generator(config, workdir: str, classifier: context.Classifier):
    """`(graphdef, state, fills, means)` of the trained generator of `workdir`.

    `means` are the training-set channel means; `fills` is `means` under mean ablation,
    else None (zero ablation).
    """
    model = nnx.eval_shape(
        lambda: new_generator(config, classifier.site_channels, classifier.num_classes)
    )  # shapes only: restoring needs no real initial weights
    graphdef, state = nnx.split(model)
    fills = {
        s: jax.ShapeDtypeStruct((c,), jnp.float32) for s, c in classifier.site_channels.items()
    }
    ckpt = checkpointing.Checkpointer(os.path.join(generator_dir(workdir), "final"))
    restored = ckpt.restore({"generator": state, "means": fills})
    ckpt.close()
    if restored is None:
        raise context.StageOrderError(
            f"no trained generator in {generator_dir(workdir)}: run "
            f"`python launch.py --config=... --workdir={workdir} --mode=train_generator` first"
        )
    _, tree, _ = restored
    fills = tree["means"] if config.generator.ablation == "mean" else None
    return graphdef, tree["generator"], fills, tree["means"]


class Explainer:
    """A trained classifier + generator, ready to explain batches of images."""

    def __init__(self, config, classifier, gen_graphdef, gen_state, fills):
        self.config, self.classifier = config, classifier
        self.gen_graphdef, self.gen_state, self.fills = gen_graphdef, gen_state, fills
        daq = config.generator.daq
        self._temperature, self._sigma = jnp.float32(daq.temperature), jnp.float32(daq.sigma)
        self._explain = jit_explain(gen_graphdef, classifier.graphdef)

    @classmethod
    def from_workdir(cls, config, workdir: str) -> Explainer:
        classifier = context.load_classifier(config, workdir)
        gd, state, fills, _ = load_generator(config, workdir, classifier)
        return cls(config, classifier, gd, state, fills)

    def __call__(self, images) -> Pathway:
        """Explains a batch: uint8 images are normalised first, float ones used as they are.

        Raises:
          ValueError: not NxHxWxC of the classifier's size, an integer dtype other than
            uint8, or NaN/inf values.
        """
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = context.normalize(self.config, images)
        elif not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"images of dtype {images.dtype}: pass uint8 pixels (0..255, normalised here) "
                f"or float images normalised with data.normalize"
            )
        d = self.config.data
        hwc, _ = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
        data.validate_images(images, hwc)
        state = (self.gen_state, self.classifier.state)
        return self._explain(*state, images, self._temperature, self._sigma, self.fills)
