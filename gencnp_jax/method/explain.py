"""GEN-CNP in one pass, as a pure function: clean forward, generator, gated forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
