"""GEN-CNP in one pass, as a pure function: clean forward, generator, gated forward.

`channel_means` gives the mean-ablation fills (training-set mean activation per channel).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax.method import pathway
from gencnp_jax.models import classifiers, generator

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


def jit_explain(gen_graphdef: nnx.GraphDef, cls_graphdef: nnx.GraphDef):
    """`explain` with both graphdefs bound, compiled once: the one jitted explain of the package.

    Returns:
      ``fn(gen_state, cls_state, images, temperature, sigma, fills) -> Pathway``; temperature and
      sigma are traced (changing them never recompiles).
    """

    def fn(gen_state, cls_state, images, temperature, sigma, fills):
        return explain(
            gen_graphdef, gen_state, cls_graphdef, cls_state, images, temperature, sigma, fills
        )

    return jax.jit(fn)


def channel_means(cls_graphdef, cls_state, images_uint8, normalize, batch_size=500):
    """Training-set mean activation per channel of every site (mean-ablation fills)."""
    fwd = jax.jit(
        lambda s, x: jax.tree.map(
            lambda a: jnp.sum(a, axis=tuple(range(a.ndim - 1))),  # all but channels
            classifiers.forward(cls_graphdef, s, x)[1],
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
    positions = {s: math.prod(f.shape[1:-1]) for s, f in feats.items()}  # H*W, N or 1
    return {s: np.asarray(v) / (count * positions[s]) for s, v in sums.items()}
