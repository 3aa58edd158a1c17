"""Baseline pathway finders (docs/METHOD.md §6), channel-level adaptations of their reference
code, and top-k binarisation.

NeuronMCT and NeuronIntGrad follow CAMP-eXplain-AI/PathwayGrad (``src/Pruner.py``), CDRP
follows frankwang345/cdrp-detect (``get_critical_path``). Each finder takes a
`FrozenClassifier` (whose fills are the ablation the scores assume) and returns ``(scores,
gates)`` as ``site -> f32[B, C]``; each is a pure, jit-able function. Binarisation keeps the
top ``round(d * N)`` channels of all N channels (one global threshold across sites), ties
broken at random by a seeded key, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp

from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

Gates = gates_lib.Gates
CDRP_MAX_GATE = 5.0  # the reference clamps every gate to [0, 5] after each step
CDRP_MOMENTUM = 0.9  # the reference's SGD momentum
CDRP_THRESHOLD = 0.5  # own gates: lambda > 0.5 (the reference's binarisation)


def _per_instance(value, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))


def _key(key: jax.Array | None) -> jax.Array:
    return jax.random.key(0) if key is None else key


def top_k(
    scores_BxN: jax.Array,
    k_B: jax.Array,
    key: jax.Array | None = None,
    rows_B: jax.Array | None = None,
) -> jax.Array:
    """1 for the ``k_B[b]`` highest scores of row b, else 0: ``f32[B, N]``.

    Rows are ranked lexicographically by ``(score, u)``, ``u`` a key-drawn random permutation
    of the row's columns: tied scores are ordered at random, never by position. Exact in count.
    With `rows_B` (e.g. example indices), row b draws ``u`` from ``fold_in(key, rows_B[b])``,
    so a row's choice does not depend on the batch it is in.
    """
    b, n = scores_BxN.shape
    if rows_B is None:
        u_BxN = jax.random.uniform(_key(key), (b, n))
    else:
        u_BxN = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(_key(key), r), (n,)))(
            rows_B
        )
    perm_BxN = jnp.argsort(u_BxN, axis=-1)
    permuted_BxN = jnp.take_along_axis(scores_BxN, perm_BxN, -1)
    order_BxN = jnp.take_along_axis(perm_BxN, jnp.argsort(-permuted_BxN, -1, stable=True), -1)
    ranks_BxN = jnp.argsort(order_BxN, axis=-1)
    return (ranks_BxN < k_B[:, None]).astype(jnp.float32)


def top_k_at_density(scores_BxN, density_B, key=None, rows_B=None) -> jax.Array:
    """`top_k` with ``k = round(density * N)`` per row (`density_B` a float or ``f32[B]``)."""
    k_B = jnp.round(_per_instance(density_B, scores_BxN.shape[0]) * scores_BxN.shape[-1])
    return top_k(scores_BxN, k_B, key, rows_B)


def gates_at_density(scores: Mapping[str, jax.Array], density_B, key=None) -> Gates:
    """Keeps per instance the top ``round(density * N)`` neurons over all sites (N = all neurons).

    One global threshold across sites (flattened in sorted site order), random tie-breaking
    by `key` (`top_k`). `density_B` is a float or ``f32[B]``.
    """
    top_BxN = top_k_at_density(gates_lib.flatten(scores), density_B, key)
    return gates_lib.unflatten(top_BxN, {s: v.shape[-1] for s, v in scores.items()})


def gates_at_site_density(scores: Mapping[str, jax.Array], site_density: Mapping, key=None):
    """Keeps per instance the top ``round(site_density[site] * C_site)`` neurons at each site."""
    keys = jax.random.split(_key(key), len(scores))
    out = {}
    for k, (site, s_BxC) in zip(keys, sorted(scores.items()), strict=True):
        k_B = jnp.round(_per_instance(site_density[site], s_BxC.shape[0]) * s_BxC.shape[-1])
        out[site] = top_k(s_BxC, k_B, k)
    return out


def _classes(classifier: FrozenClassifier, images, classes_B):
    if classes_B is not None:
        return classes_B.astype(jnp.int32)
    return jnp.argmax(classifier.logits(images), -1)


def _element_grads(classifier: FrozenClassifier, images, classes_B, alpha_site=None, alpha=1.0):
    """``d y_c / d g`` of per-element gates ``g`` (``f32[B, H, W, C]`` per site), all open, or
    with `alpha_site` at ``alpha``. With ``a~ = g a + (1 - g) fill``, the element gradient is
    ``(a - fill) * dy_c/da~``: at ``g = 1`` NeuronMCT's ``a * dy_c/da`` (fill 0)."""
    _, features = classifier.classify(images)
    gates = {s: jnp.ones(f.shape, jnp.float32) for s, f in features.items()}
    if alpha_site is not None:
        gates[alpha_site] = gates[alpha_site] * alpha

    def class_logit(g):
        logits_BxK = classifier.logits(images, g)
        # inference mode: instances are independent, so the grad of the sum is per instance
        return jnp.take_along_axis(logits_BxK, classes_B[:, None], -1).sum()

    return jax.grad(class_logit)(gates)


def _sum_space(x_BxHxWxC: jax.Array) -> jax.Array:
    return x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1, x_BxHxWxC.shape[-1]).sum(1)


def neuron_mct(classifier: FrozenClassifier, images, classes_B=None, density=0.5, key=None):
    """NeuronMCT (Khakzar et al. 2021, PathwayGrad ``_compute_taylor_scores``).

    Each element scores ``|(a - fill) * dy_c/da|`` (``|a * dy_c/da|`` under zero ablation), a
    channel the sum over space: ``score_c = sum_hw |(a - fill) dy_c/da|``. Gates: one global
    threshold at `density` (float or ``f32[B]``). ``c`` = the prediction by default.

    Deviation from the reference: PathwayGrad scores and gates *elements* (every position of
    every channel) and ablates to zero; here the element scores are summed over space into a
    channel score (gates are channels) and closed channels take the classifier's fills.
    """
    classes_B = _classes(classifier, images, classes_B)
    grads = _element_grads(classifier, images, classes_B)
    scores = {s: _sum_space(jnp.abs(g)) for s, g in grads.items()}
    return scores, gates_at_density(scores, density, key)


def neuron_mct_signed(classifier: FrozenClassifier, images, classes_B=None, density=0.5, key=None):
    """NeuronMCT on channel gates: ``score_c = |sum_hw (a - fill) dy_c/da|`` (signs cancel)."""
    classes_B = _classes(classifier, images, classes_B)
    grads = _element_grads(classifier, images, classes_B)
    scores = {s: jnp.abs(_sum_space(g)) for s, g in grads.items()}
    return scores, gates_at_density(scores, density, key)


def neuron_intgrad(
    classifier: FrozenClassifier, images, classes_B=None, *, steps: int, density=0.5, key=None
):
    """NeuronIntGrad (PathwayGrad ``_calc_integrad_scores``): one site at a time.

    At site s only, the activation runs from the baseline (the ablation fill) to itself,
    ``a~(alpha) = fill + alpha (a - fill)``, ``alpha = 0, 1/(T-1), ..., 1`` (`steps` = T
    points), every other site intact. Per element ``|(a - fill) mean_alpha dy_c/da~(alpha)|``,
    per channel the sum over space. Gates: one global threshold at `density`.

    Deviations from the reference: element scores summed over space into channel scores,
    the baseline is the classifier's fill (the reference integrates from zero), and the
    mean over the T points is a plain mean (the reference's Riemann sum, same ranking).
    """
    classes_B = _classes(classifier, images, classes_B)
    alphas_T = jnp.linspace(0.0, 1.0, steps)
    _, features = classifier.classify(images)
    scores = {}
    for site in features:
        grads_T = jax.lax.map(
            lambda a, s=site: _element_grads(classifier, images, classes_B, s, a)[s],
            alphas_T,
        )
        scores[site] = _sum_space(jnp.abs(grads_T.mean(0)))
    return scores, gates_at_density(scores, density, key)


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
    return scores, gates_at_site_density(scores, site_density, jax.random.fold_in(key, 1))


def topk_activation(classifier: FrozenClassifier, images, density=0.5, key=None):
    """Top-k activation: ``score = mean_hw a`` (clean pass); one global threshold at `density`.

    Raw activations are compared across sites, so sites with large activations dominate; this
    is the naive baseline as named.
    """
    _, features = classifier.classify(images)
    scores = {s: a.reshape(a.shape[0], -1, a.shape[-1]).mean(1) for s, a in features.items()}
    return scores, gates_at_density(scores, density, key)


def cdrp_update(lam, vel, ce_grad, gamma: float, lr: float, momentum: float):
    """One CDRP step (SGD with momentum, as torch.optim.SGD, then the clamp to [0, 5]).

    ``d = dCE/dlambda + gamma sign(lambda)`` with ``sign(0) = 0`` (torch's subgradient of
    ``|lambda|`` at 0: the L1 term never pushes a closed gate); ``v <- momentum v + d``;
    ``lambda <- clip(lambda - lr v, 0, 5)``. Returns ``(lambda, v)`` (pytrees).
    """
    grad = jax.tree.map(lambda g, x: g + gamma * jnp.sign(x), ce_grad, lam)
    vel = jax.tree.map(lambda v, g: momentum * v + g, vel, grad)
    lam = jax.tree.map(lambda x, v: jnp.clip(x - lr * v, 0.0, CDRP_MAX_GATE), lam, vel)
    return lam, vel


@flax.struct.dataclass
class CdrpSettings:
    """CDRP's optimisation (cdrp-detect's values are the config's defaults).

    Attributes:
      steps: SGD steps per image (static: a Python int).
      gamma: weight of the L1 term; lr, momentum: SGD's; threshold: own gates ``lambda >``.
    """

    steps: int = flax.struct.field(pytree_node=False)
    gamma: float
    lr: float
    momentum: float
    threshold: float


def cdrp(classifier: FrozenClassifier, images, settings: CdrpSettings):
    """CDRP / distillation guided routing (Wang et al. 2018, cdrp-detect), vmapped over instances.

    Per instance, channel gates ``lambda`` start at 1 and minimise
    ``J(lambda) = CE(p, p~) + gamma * |lambda|_1 = -sum_k p_k log p~_k + gamma * sum |lambda|``
    (``p = softmax(H(x))``, ``p~ = softmax(H(x; lambda))``) by exactly `steps` `cdrp_update`
    steps, no early stop. As in the reference, iterate t is evaluated before step t (iterates
    ``0..steps-1``); the kept one has the lowest ``J`` among those whose prediction is still
    ``argmax p`` (iterate 0, the full model, always qualifies). Scores are the kept lambdas,
    gates ``lambda > threshold``.

    Deviations from the reference: cdrp-detect gates the conv outputs of a torchvision model
    one image at a time and a closed gate leaves zero; here the gates sit at the classifier's
    gate sites, images are vmapped, and a closed gate leaves the classifier's fill (the
    evaluation's ablation).
    """
    site_channels = classifier.site_channels
    s = settings

    def one(classifier, image_HxWxC):
        images_1 = image_HxWxC[None]
        p_1xK = jax.nn.softmax(classifier.logits(images_1))
        target = jnp.argmax(p_1xK, -1)

        def cross_entropy(lam):
            logits_1xK = classifier.logits(images_1, lam)
            return -jnp.sum(p_1xK * jax.nn.log_softmax(logits_1xK)), jnp.argmax(logits_1xK, -1)

        def body(_, carry):
            lam, vel, best, best_obj = carry
            (ce, pred), ce_grad = jax.value_and_grad(cross_entropy, has_aux=True)(lam)
            obj = ce + s.gamma * sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(lam))
            better = (obj < best_obj) & (pred == target)[0]
            best = jax.tree.map(lambda b, x: jnp.where(better, x, b), best, lam)
            lam, vel = cdrp_update(lam, vel, ce_grad, s.gamma, s.lr, s.momentum)
            return lam, vel, best, jnp.where(better, obj, best_obj)

        ones = gates_lib.all_ones(site_channels, 1)
        zeros = jax.tree.map(jnp.zeros_like, ones)
        carry = (ones, zeros, ones, jnp.asarray(jnp.inf, jnp.float32))
        best = jax.lax.fori_loop(0, s.steps, body, carry)[2]
        return jax.tree.map(lambda x: x[0], best)

    scores = jax.vmap(one, in_axes=(None, 0))(classifier, images)
    return scores, jax.tree.map(lambda x: (x > s.threshold).astype(jnp.float32), scores)
