"""Explaining inputs with a trained generator: the pure `explain` and a notebook helper.

explainer = Explainer.from_workdir(config, "runs/default")
pathway = explainer(images_uint8)        # Pathway: gates, scores, logits
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax import checkpointing, classifiers, context, data, generator, pathway

Pathway = pathway.Pathway


def explain(
    gen_graphdef: nnx.GraphDef,
    gen_state: nnx.State,
    cls_graphdef: nnx.GraphDef,
    cls_state: nnx.State,
    images_BxHxWxC: jax.Array,
    temperature: float | jax.Array = 2.0,
    sigma: float | jax.Array = 2.0,
    fills: dict[str, jax.Array] | None = None,
) -> Pathway:
    """GEN-CNP in one pass: clean forward, generator, gated forward (pure, jit-able).

    Raises:
      ValueError: images that are not a float NHWC batch (a static check: works under jit;
        `Explainer` also checks the size and the values).
    """
    if images_BxHxWxC.ndim != 4 or not jnp.issubdtype(images_BxHxWxC.dtype, jnp.floating):
        raise ValueError(
            f"images must be a float NHWC batch (rank 4), got shape {tuple(images_BxHxWxC.shape)} "
            f"of {images_BxHxWxC.dtype}: normalise uint8 images with data.normalize"
        )
    full_logits_BxK, features = classifiers.forward(cls_graphdef, cls_state, images_BxHxWxC)
    scores, gates, _ = generator.explain_scores(
        gen_graphdef, gen_state, features, temperature, sigma
    )
    pathway_logits_BxK, _ = classifiers.forward(
        cls_graphdef, cls_state, images_BxHxWxC, gates, fills
    )
    return Pathway.create(gates, scores, full_logits_BxK, pathway_logits_BxK)


def channel_means(cls_graphdef, cls_state, images_uint8, normalize, batch_size=500):
    """Training-set mean activation per channel of every site (mean-ablation fills)."""
    fwd = jax.jit(
        lambda s, x: jax.tree.map(
            lambda a: jnp.sum(a, axis=(0, 1, 2)), classifiers.forward(cls_graphdef, s, x)[1]
        )
    )
    sums, count = None, 0
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start : start + batch_size]
        out = fwd(cls_state, normalize(batch))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        count += len(batch)
    _, feats = jax.eval_shape(
        lambda s, x: classifiers.forward(cls_graphdef, s, x),
        cls_state,
        jnp.zeros((1, *images_uint8.shape[1:]), jnp.float32),
    )
    per_pixel = {s: f.shape[1] * f.shape[2] for s, f in feats.items()}
    return {s: np.asarray(v) / (count * per_pixel[s]) for s, v in sums.items()}


def new_generator(config, site_channels, num_classes) -> generator.Generator:
    g = config.generator
    return generator.Generator(
        site_channels,
        num_classes,
        g.hidden,
        g.cell,
        tuple(g.pooling),
        g.init_open,
        rngs=nnx.Rngs(config.seed + 1),
    )


def generator_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "generator")


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
        g = config.generator
        self._explain = jax.jit(
            lambda gs, cs, x, f: explain(
                gen_graphdef, gs, classifier.graphdef, cs, x, g.daq_temperature, g.daq_sigma, f
            )
        )

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
        return self._explain(self.gen_state, self.classifier.state, images, self.fills)
