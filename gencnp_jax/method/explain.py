"""GEN-CNP in one pass, as a pure function: clean forward, generator, gated forward.

`channel_means` gives the mean-ablation fills (training-set mean activation per channel).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.method import evidence, pathway
from gencnp_jax.models import daq
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator

Pathway = pathway.Pathway


def explain(
    generator: FrozenGenerator,
    classifier: FrozenClassifier,
    images_BxHxWxC: jax.Array,
    settings: daq.Settings,
) -> Pathway:
    """GEN-CNP in one pass: clean forward (and its backward, for a generator that reads
    first-order effects), generator, gated forward (pure, jit-able).

    Args:
      generator: the trained generator.
      classifier: the classifier it explains, with the fills its closed gates take.
      images_BxHxWxC: a float batch, normalised as the classifier was trained.
      settings: DAQ's temperature and kernel width.

    Raises:
      ValueError: images that are not a float NHWC batch (a static check: works under jit;
        `Explainer` also checks the size and the values).
    """
    if images_BxHxWxC.ndim != 4 or not jnp.issubdtype(images_BxHxWxC.dtype, jnp.floating):
        raise ValueError(
            f"images must be a float NHWC batch (rank 4), got shape {tuple(images_BxHxWxC.shape)} "
            f"of {images_BxHxWxC.dtype}: normalise uint8 images with data.normalize"
        )
    full_logits_BxK, features, fo = evidence.read(
        classifier, images_BxHxWxC, generator.reads_gradients
    )
    scores, gates, ranking = generator.pathway_and_ranking(features, settings, fo)
    pathway_logits_BxK = classifier.logits(images_BxHxWxC, gates)
    return Pathway.create(gates, scores, full_logits_BxK, pathway_logits_BxK, ranking=ranking)


jit_explain = jax.jit(explain)  # the one jitted explain of the package (pytrees: no rebinding)


def channel_means(classifier: FrozenClassifier, images_uint8, normalize, batch_size: int):
    """Training-set mean activation per channel of every site (mean-ablation fills), summed
    over batches of `batch_size` images (its sums, so its float rounding, depend on it)."""
    fwd = jax.jit(
        lambda c, x: jax.tree.map(
            lambda a: jnp.sum(a, axis=tuple(range(a.ndim - 1))),  # all but channels
            c.classify(x)[1],
        )
    )
    sums, count = None, 0
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start : start + batch_size]
        out = fwd(classifier, normalize(batch))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        count += len(batch)
    _, feats = jax.eval_shape(
        lambda c, x: c.classify(x), classifier, jnp.zeros((1, *images_uint8.shape[1:]), jnp.float32)
    )
    positions = {s: math.prod(f.shape[1:-1]) for s, f in feats.items()}  # H*W, N or 1
    return {s: np.asarray(v) / (count * positions[s]) for s, v in sums.items()}
