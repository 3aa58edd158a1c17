"""Input-space explanations of a (gated) classifier: Grad-CAM and the pathway gradient.

Pure jnp functions of a `FrozenClassifier` (its fills: what the pathway's closed gates
leave); jit them with `site` bound (e.g. `functools.partial`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from gencnp_jax.method import explain
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator


def _class_logit(logits_BxK: jax.Array, classes_B: jax.Array) -> jax.Array:
    """``f32[B]``: each row's logit of its class (pre-softmax, as in Grad-CAM)."""
    return jnp.take_along_axis(logits_BxK, classes_B[:, None].astype(jnp.int32), axis=1)[:, 0]


def _full_gates(features: Mapping[str, jax.Array], gates: Mapping[str, jax.Array] | None):
    """`gates` itself, or all-open gates for every site when `gates` is None."""
    if gates is not None:
        return dict(gates)
    return {s: jnp.ones((a.shape[0], a.shape[-1]), jnp.float32) for s, a in features.items()}


def site_activation_and_grad(
    classifier: FrozenClassifier,
    images_BxHxWxC: jax.Array,
    classes_B: jax.Array,
    site: str,
    gates: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated activation at `site` and the gradient of the class logit w.r.t. it.

    The activation is what flows on from the site, ``g * a + (1 - g) * fill``. Its
    gradient is exact (no division by the activation): a second pass closes every
    element of `site` (4-D gate of zeros) and passes that activation in as the fill
    value, so the layers after `site` see it unchanged and it is the only input
    there; ``jax.grad`` w.r.t. it is ``d y_c / d act``. This relies on
    `apply_gate` broadcasting a per-element fill ``f32[B, h, w, C]``.

    Returns:
      ``(act_Bxhxwxc, grad_Bxhxwxc)``.
    """
    fills = classifier.fills
    _, features = classifier.classify(images_BxHxWxC, gates)
    if site not in features:
        raise KeyError(f"unknown gate site {site!r}; the classifier's sites: {list(features)}")
    gates = _full_gates(features, gates)
    act = gates_lib.apply_gate(features[site], site, gates, fills)
    act = jax.lax.stop_gradient(act)

    def logit_sum(act_in):
        site_gates = {**gates, site: jnp.zeros(act_in.shape, jnp.float32)}
        site_fills = {**(fills or {}), site: act_in}
        logits = classifier.with_fills(site_fills).logits(images_BxHxWxC, site_gates)
        # Instances are independent at inference, so the sum's gradient is per-instance.
        return jnp.sum(_class_logit(logits, classes_B))

    return act, jax.grad(logit_sum)(act)


def _as_grid(x: jax.Array, site: str) -> jax.Array:
    """``(B, h, w, C)`` as it is; tokens ``(B, N, C)`` with ``N = n * n`` as the row-major
    ``n x n`` patch grid (ViT, Mixer); anything else cannot be mapped onto the image."""
    if x.ndim == 4:
        return x
    n = math.isqrt(x.shape[1]) if x.ndim == 3 else 0
    if n and n * n == x.shape[1]:
        return x.reshape(x.shape[0], n, n, x.shape[2])
    raise ValueError(
        f"Grad-CAM at site {site!r}: its activations have shape {tuple(x.shape)}, not "
        f"(B, H, W, C) nor a square grid of tokens (B, n*n, C); choose another site "
        f"(config.eval.gradcam_site)"
    )


def grad_cam(
    classifier: FrozenClassifier,
    images_BxHxWxC: jax.Array,
    classes_B: jax.Array,
    site: str,
    gates: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017) of the class logit at a gate site.

    ``alpha_k = mean_ij d y_c / d A_ij^k``, ``cam = ReLU(sum_k alpha_k A^k)`` with
    ``A`` the site's gated activation (so the map shows the pathway model when
    `gates` is given, the full model when None), bilinearly upsampled to the image
    size and divided by its per-image maximum (an all-zero map stays zero).

    Args:
      classifier: the classifier, with the fills of its closed gates.
      images_BxHxWxC: input images.
      classes_B: the class to explain per image (int).
      site: the gate site whose activation is used (often the deepest).
      gates: the pathway's gates (``site -> f32[B, C]``); None = full model.

    Returns:
      ``f32[B, H, W]`` in ``[0, 1]``.

    Raises:
      ValueError: a site whose activations are not a spatial or square token grid.
    """
    act, grad = site_activation_and_grad(classifier, images_BxHxWxC, classes_B, site, gates)
    act, grad = _as_grid(act, site), _as_grid(grad, site)
    alpha_BxC = jnp.mean(grad, axis=(1, 2))
    cam_Bxhxw = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", act, alpha_BxC))
    b, h, w = images_BxHxWxC.shape[:3]
    cam_BxHxW = jax.nn.relu(jax.image.resize(cam_Bxhxw, (b, h, w), method="bilinear"))
    peak = jnp.max(cam_BxHxW, axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam_BxHxW / jnp.where(peak > 0, peak, 1.0), 0.0)


def pathway_gradient(
    classifier: FrozenClassifier,
    images_BxHxWxC: jax.Array,
    classes_B: jax.Array,
    gates: Mapping[str, jax.Array] | None,
) -> jax.Array:
    """Pathway gradient (Khakzar et al. 2021): ``d y_c / d x`` through the gated model.

    Args:
      classifier: the classifier, with the fills of its closed gates.
      images_BxHxWxC: input images.
      classes_B: the class whose logit ``y_c`` is differentiated, per image.
      gates: the pathway's gates; None gives the plain input gradient.

    Returns:
      ``f32[B, H, W, C]``, the same shape as the images.
    """

    def logit_sum(x):
        return jnp.sum(_class_logit(classifier.logits(x, gates), classes_B))

    return jax.grad(logit_sum)(images_BxHxWxC)


def pathway_saliency(
    generator: FrozenGenerator,
    classifier: FrozenClassifier,
    images_BxHxWxC: jax.Array,
    settings: daq.Settings,
    site: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Explains `images` (GEN-CNP) and maps the explained class: ``(Grad-CAM of the full
    model f32[B, H, W], Grad-CAM of the pathway model f32[B, H, W], pathway gradient
    f32[B, H, W, C])`` (`grad_cam` at `site`, `pathway_gradient`)."""
    p = explain.explain(generator, classifier, images_BxHxWxC, settings)
    c = p.explained_class
    cam_full = grad_cam(classifier, images_BxHxWxC, c, site)
    cam_pathway = grad_cam(classifier, images_BxHxWxC, c, site, p.gates)
    grad = pathway_gradient(classifier, images_BxHxWxC, c, p.gates)
    return cam_full, cam_pathway, grad
