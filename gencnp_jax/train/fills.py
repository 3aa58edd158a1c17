"""Mean-ablation fills: every channel's mean activation over a split, on the mesh."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.io import batched, sharding
from gencnp_jax.models.frozen import FrozenClassifier


def _per_image_means(classifier: FrozenClassifier, images):
    """``site -> f32[B, C]``: each image's mean activation per channel over its positions."""
    _, features = classifier.classify(images)
    return jax.tree.map(lambda a: jnp.mean(a, axis=tuple(range(1, a.ndim - 1))), features)


_jit_per_image_means = jax.jit(_per_image_means)


def channel_means(
    classifier: FrozenClassifier,
    images_uint8: np.ndarray,
    normalize: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> dict[str, np.ndarray]:
    """``site -> f32[C]``: the mean of every channel's activation over `images_uint8` and
    their positions, all gates open (the fills of mean ablation, on the training split).

    Each image's mean over its positions is taken on the mesh (batches of `batch_size`); the
    mean over images in float64 on the host. Every image has the same number of positions,
    so this is the mean over images and positions, and it does not depend on the batch size
    or the number of devices.
    """
    placed = sharding.replicate(mesh, classifier)
    means_BxC = batched.map_batches(
        lambda x: _jit_per_image_means(placed, x),
        lambda idx: normalize(images_uint8[idx]),
        len(images_uint8),
        batch_size,
        mesh,
    )
    return {s: v.astype(np.float64).mean(0).astype(np.float32) for s, v in means_BxC.items()}
