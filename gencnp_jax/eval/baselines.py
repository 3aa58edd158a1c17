"""Baseline pathway finders (DESIGN §6): CDRP, NeuronMCT, NeuronIntGrad, random, top-k activation.

Each returns ``(scores, gates)`` as ``site -> f32[B, C]`` and is a pure, jit-able function.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib

Gates = gates_lib.Gates


def _per_instance(value, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))


def _top_k(scores_BxN: jax.Array, k_B: jax.Array) -> jax.Array:
    """1 for the `k_B[b]` highest scores of row b (ties broken by position), else 0."""
    order_BxN = jnp.argsort(-scores_BxN, axis=-1, stable=True)
    ranks_BxN = jnp.argsort(order_BxN, axis=-1)
    return (ranks_BxN < k_B[:, None]).astype(jnp.float32)


def gates_at_density(scores: Mapping[str, jax.Array], density_B) -> Gates:
    """Keeps per instance the top ``round(density * N)`` neurons over all sites (N = all neurons).

    One global threshold across sites, as NeuronMCT. Exact in count; `density_B` is a float or
    ``f32[B]``.
    """
    flat_BxN = gates_lib.flatten(scores)
    n = flat_BxN.shape[-1]
    k_B = jnp.round(_per_instance(density_B, flat_BxN.shape[0]) * n)
    return gates_lib.unflatten(_top_k(flat_BxN, k_B), {s: v.shape[-1] for s, v in scores.items()})


def gates_at_site_density(scores: Mapping[str, jax.Array], site_density: Mapping) -> Gates:
    """Keeps per instance the top ``round(site_density[site] * C_site)`` neurons at each site."""
    out = {}
    for site, s_BxC in scores.items():
        k_B = jnp.round(_per_instance(site_density[site], s_BxC.shape[0]) * s_BxC.shape[-1])
        out[site] = _top_k(s_BxC, k_B)
    return out


def _site_channels(graphdef: nnx.GraphDef, state: nnx.State) -> dict[str, int]:
    return dict(nnx.merge(graphdef, state).site_channels)


def _class_logit_grad(graphdef, state, images, classes_B, fills, alpha=1.0) -> Gates:
    """``d y_c / d g`` at gates ``alpha * 1`` (logits, not probabilities), per instance."""
    ones = gates_lib.all_ones(_site_channels(graphdef, state), images.shape[0])

    def class_logit(g):
        logits_BxK, _ = classifiers.forward(graphdef, state, images, g, fills)
        # inference mode: instances are independent, so the grad of the sum is per instance
        return jnp.take_along_axis(logits_BxK, classes_B[:, None], -1).sum()

    return jax.grad(class_logit)(jax.tree.map(lambda g: alpha * g, ones))


def _classes(graphdef, state, images, classes_B, fills):
    if classes_B is not None:
        return classes_B.astype(jnp.int32)
    return jnp.argmax(classifiers.forward(graphdef, state, images, None, fills)[0], -1)


def neuron_mct(graphdef, state, images, classes_B=None, density=0.5, fills=None):
    """NeuronMCT (Khakzar et al. 2021): ``score = |sum_hw a * dy_c/da|`` per channel.

    With ``g * a + (1 - g) * fill`` at a site, ``dy_c/dg`` at ``g = 1`` is
    ``sum_hw (a - fill) * dy_c/da``, so the score is ``|grad of y_c w.r.t. all-ones gates|``.
    Gates: one global threshold at `density` (float or ``f32[B]``). ``c`` = argmax by default.
    """
    classes_B = _classes(graphdef, state, images, classes_B, fills)
    scores = jax.tree.map(jnp.abs, _class_logit_grad(graphdef, state, images, classes_B, fills))
    return scores, gates_at_density(scores, density)


def neuron_intgrad(graphdef, state, images, classes_B=None, density=0.5, steps=16, fills=None):
    """NeuronIntGrad: ``score = |(1 - 0) * mean_{alpha} dy_c/dg (alpha * 1)|``, gates 0 -> 1.

    Midpoint Riemann sum with ``alpha = (t + 0.5) / steps``; the gradient points run through
    `jax.lax.map` (one trace). Gates: one global threshold at `density`.
    """
    classes_B = _classes(graphdef, state, images, classes_B, fills)
    alphas_T = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    grads_T = jax.lax.map(
        lambda a: _class_logit_grad(graphdef, state, images, classes_B, fills, a), alphas_T
    )
    scores = jax.tree.map(lambda g_TxBxC: jnp.abs(g_TxBxC.mean(0)), grads_T)
    return scores, gates_at_density(scores, density)


def random_scores(key: jax.Array, site_channels: Mapping[str, int], batch: int) -> Gates:
    """Uniform scores in [0, 1) per neuron, one independent key per site."""
    keys = jax.random.split(key, len(site_channels))
    return {
        site: jax.random.uniform(k, (batch, c))
        for k, (site, c) in zip(keys, site_channels.items(), strict=True)
    }


def random_pathway(key, site_channels, site_density: Mapping) -> tuple[Gates, Gates]:
    """Random pathway at a given per-site density (e.g. GEN-CNP's): ``(scores, gates)``."""
    batch = jnp.shape(next(iter(site_density.values())))[0]
    scores = random_scores(key, site_channels, batch)
    return scores, gates_at_site_density(scores, site_density)


def topk_activation(graphdef, state, images, density=0.5, fills=None):
    """Top-k activation: ``score = mean_hw a`` (clean pass); one global threshold at `density`.

    Raw activations are compared across sites, so sites with large activations dominate; this
    is the naive baseline as named.
    """
    _, features = classifiers.forward(graphdef, state, images, None, fills)
    scores = {s: a.reshape(a.shape[0], -1, a.shape[-1]).mean(1) for s, a in features.items()}
    return scores, gates_at_density(scores, density)


def cdrp(
    graphdef,
    state,
    images,
    steps: int = 30,
    gamma: float = 0.05,
    lr: float = 0.1,
    momentum: float = 0.9,
    threshold: float = 0.5,
    fills=None,
):
    """CDRP / distillation guided routing (Wang et al. 2018), vmapped over instances.

    Per instance, channel gates ``lambda >= 0`` start at 1 and minimise
    ``J(lambda) = CE(p, p~) + gamma * |lambda|_1 = -sum_k p_k log p~_k + gamma * sum |lambda|``
    with ``p = softmax(H(x))``, ``p~ = softmax(H(x; lambda))``, by SGD with momentum
    (``v <- momentum * v + dJ; lambda <- max(0, lambda - lr * v)``) for `steps` steps. Every
    iterate (the start included) is evaluated; the kept one has the lowest ``J`` among those
    whose prediction is still ``argmax p``. Scores are the kept lambdas, gates
    ``lambda > threshold``; for matched density use ``gates_at_density(scores, d)``.
    """
    site_channels = _site_channels(graphdef, state)

    def one(state, image_HxWxC):
        images_1 = image_HxWxC[None]
        p_1xK = jax.nn.softmax(classifiers.forward(graphdef, state, images_1, None, fills)[0])
        target = jnp.argmax(p_1xK, -1)

        def objective(lam):
            logits_1xK, _ = classifiers.forward(graphdef, state, images_1, lam, fills)
            ce = -jnp.sum(p_1xK * jax.nn.log_softmax(logits_1xK))
            l1 = sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(lam))
            return ce + gamma * l1, jnp.argmax(logits_1xK, -1)

        def body(_, carry):
            lam, vel, best, best_obj = carry
            (obj, pred), grad = jax.value_and_grad(objective, has_aux=True)(lam)
            better = (obj < best_obj) & (pred == target)[0]
            best = jax.tree.map(lambda b, x: jnp.where(better, x, b), best, lam)
            vel = jax.tree.map(lambda v, g: momentum * v + g, vel, grad)
            lam = jax.tree.map(lambda x, v: jnp.maximum(x - lr * v, 0.0), lam, vel)
            return lam, vel, best, jnp.where(better, obj, best_obj)

        ones = gates_lib.all_ones(site_channels, 1)
        zeros = jax.tree.map(jnp.zeros_like, ones)
        # steps + 1 evaluations: the last update is never evaluated and is dropped
        carry = (ones, zeros, ones, jnp.asarray(jnp.inf, jnp.float32))
        best = jax.lax.fori_loop(0, steps + 1, body, carry)[2]
        return jax.tree.map(lambda x: x[0], best)

    scores = jax.vmap(one, in_axes=(None, 0))(state, images)
    return scores, jax.tree.map(lambda s: (s > threshold).astype(jnp.float32), scores)
