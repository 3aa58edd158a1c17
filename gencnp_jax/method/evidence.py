"""What the generator reads of an image: the classifier's clean features and, optionally, each
channel's first-order effect on the predicted class (docs/METHOD.md §3).

The first-order effect of channel ``k`` is the derivative of the predicted class's logit with
respect to its gate at all gates open, ``d y_c / d g_k = sum_space (a_k - fill_k) dy_c/da_k``:
positive when the channel supports the class, about what closing it alone would cost. It costs
one backward pass. Each image's effects are divided by their root mean square over all ``N``
channels, which keeps their signs and the scale between sites.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier


def first_order_effects(classifier: FrozenClassifier, images_BxHxWxC: jax.Array):
    """``(full_logits f32[B, K], features, fo site -> f32[B, C])`` in one forward and one
    backward pass (under the classifier's fills), ``fo`` RMS-normalised per image."""
    open_gates = {
        s: jnp.ones((images_BxHxWxC.shape[0], c), jnp.float32)
        for s, c in classifier.site_channels.items()
    }

    def predicted_logit(gates):
        logits_BxK, features = classifier.classify(images_BxHxWxC, gates)
        classes_B = jnp.argmax(jax.lax.stop_gradient(logits_BxK), -1)
        chosen = jnp.take_along_axis(logits_BxK, classes_B[:, None], -1)
        return jnp.sum(chosen), (logits_BxK, features)

    fo, (logits_BxK, features) = jax.grad(predicted_logit, has_aux=True)(open_gates)
    flat_BxN = gates_lib.flatten(fo)
    rms_Bx1 = jnp.sqrt(jnp.mean(jnp.square(flat_BxN), -1, keepdims=True)) + 1e-8
    fo = {s: jax.lax.stop_gradient(v / rms_Bx1) for s, v in fo.items()}
    return jax.lax.stop_gradient(logits_BxK), features, fo


def read(classifier: FrozenClassifier, images_BxHxWxC: jax.Array, grad_evidence: bool):
    """``(full_logits, features, fo or None)``: what a generator with (`grad_evidence`) or
    without first-order effects reads; without them it costs one clean forward pass."""
    if grad_evidence:
        return first_order_effects(classifier, images_BxHxWxC)
    logits_BxK, features = classifier.classify(images_BxHxWxC)
    return logits_BxK, features, None
