"""The evaluated methods' score passes (docs/METHOD.md §6) and the shared metric passes (§7).

Every method is reduced to flat per-instance scores ``f32[B, N]`` (N = all channels, sites in
sorted order) that rank its channels, plus its own gates; `evaluate` binarises the scores at
fixed densities (`baselines.top_k_at_density`) and feeds every mask through one metric pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gencnp_jax.eval import accumulator as metric_accumulator
from gencnp_jax.eval import baselines, metrics, perturbation
from gencnp_jax.method import evidence
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib

ScoreFn = Callable[..., dict]  # (generator, classifier, images) -> {"scores": f32[B, N], ...}
# per-instance methods whose scores come from a score pass over the test images
SCORED = ("gencnp", "cdrp", "neuron_mct", "neuron_mct_signed", "neuron_intgrad", "topk_activation")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Plain values the methods need (read from the config by `evaluate`); no defaults here:
    the config holds them."""

    daq: daq.Settings
    cdrp: baselines.CdrpSettings
    intgrad_steps: int
    auc_points: int


def make_score_fns(s: Settings) -> dict[str, ScoreFn]:
    """``name -> fn(generator, classifier, images) -> {"scores": f32[B, N], ...}`` for every
    name in `SCORED`.

    The classifier's fills are the ablation the gradient baselines take as their baseline and
    CDRP optimises under. GEN-CNP ranks by its scores before their sigmoid (sigmoids saturate
    to exactly 1.0 and tie) and also returns its own ``gates`` and the ``full_logits``; CDRP its
    own ``gates`` (``lambda > cdrp threshold``). A generator with a rank head ranks by that
    head and gates by its gate head.
    """

    def gencnp(generator, classifier, images):
        full_logits_BxK, features, fo = evidence.read(classifier, images, generator.reads_gradients)
        _, gates, ranking = generator.pathway_and_ranking(features, s.daq, fo)
        return {
            "scores": gates_lib.flatten(ranking),
            "gates": gates_lib.flatten(gates),
            "full_logits": full_logits_BxK,
        }

    def cdrp(generator, classifier, images):
        del generator
        scores, gates = baselines.cdrp(classifier, images, s.cdrp)
        return {"scores": gates_lib.flatten(scores), "gates": gates_lib.flatten(gates)}

    def gradient(fn, **kw):
        def run(generator, classifier, images):
            del generator
            scores, _ = fn(classifier, images, **kw)
            return {"scores": gates_lib.flatten(scores)}

        return run

    return {
        "gencnp": gencnp,
        "cdrp": cdrp,
        "neuron_mct": gradient(baselines.neuron_mct),
        "neuron_mct_signed": gradient(baselines.neuron_mct_signed),
        "neuron_intgrad": gradient(baselines.neuron_intgrad, steps=s.intgrad_steps),
        "topk_activation": gradient(baselines.topk_activation),
    }


def make_metric_fn(extra: bool):
    """The jitted metric pass shared by every method, density and ablation.

    ``fn(classifier, images, classes, gates_BxN, wrong=None, full_logits=None) ->
    per_instance`` (the classifier's fills: the ablation) with ``classes`` the explained
    (predicted) classes and ``per_instance`` as `accumulator.instance_metrics`. One gated
    forward (`FrozenClassifier.logits_of_passes`) over ``[x; x; x']`` with gates ``[1; P; P]``
    gives the full, pathway and partner (leakage; ``x'`` the next sample of another class)
    logits; the full model shares the pathway's program, so an all-open pathway reproduces
    its logits bit for bit. Given ``full_logits`` (e.g. of a sparse mask, where float noise
    cannot matter), the full block is skipped. With `extra`, also ``[x; 0]`` with
    ``[1 - P; P]`` (necessity_drop, null_confidence). ``wrong = (gates_BxN, classes_B)``: a
    wrong class's mask per sample, for ``class_leakage`` and ``other_class_drop`` (one more
    block).
    """

    def fn(classifier, images, classes_B, gates_BxN, wrong=None, full_logits_BxK=None):
        sites = classifier.site_channels
        gates = gates_lib.unflatten(gates_BxN, sites)
        partner_B, has_partner_B = metrics.different_class_partners(classes_B)
        image_blocks = [images, images[partner_B]]
        gate_blocks = [gates_BxN, gates_BxN]
        if full_logits_BxK is None:
            image_blocks.append(images)
            gate_blocks.append(jnp.ones_like(gates_BxN))
        if extra:
            image_blocks += [images, jnp.zeros_like(images)]
            gate_blocks += [1.0 - gates_BxN, gates_BxN]
        if wrong is not None:
            image_blocks.append(images)
            gate_blocks.append(wrong[0])
        path, part, *rest = classifier.logits_of_passes(
            [
                (x, gates_lib.unflatten(g, sites))
                for x, g in zip(image_blocks, gate_blocks, strict=True)
            ]
        )
        full = rest.pop(0) if full_logits_BxK is None else full_logits_BxK
        outputs = metric_accumulator.Outputs(
            pathway_logits_BxK=path,
            partner_logits_BxK=part,
            partner_classes_B=jnp.where(has_partner_B, classes_B[partner_B], classes_B),
            complement_logits_BxK=rest[0] if extra else None,
            null_logits_BxK=rest[1] if extra else None,
        )
        per = metric_accumulator.instance_metrics(full, outputs, gates, classes_B)
        # the pathway model's class per image (a flag: one class for every input)
        per["pathway_class"] = (jnp.argmax(path, -1).astype(jnp.float32), per["mDC"][1])
        if wrong is not None:
            transfer = metric_accumulator.Outputs(
                pathway_logits_BxK=rest[-1], pathway_classes_B=wrong[1]
            )
            other = metric_accumulator.instance_metrics(full, transfer, None, classes_B)
            per.update({k: other[k] for k in ("class_leakage", "other_class_drop")})
        return per

    return jax.jit(fn)


def make_auc_fn(num_points: int):
    """``fn(classifier, images, classes, scores_BxN, rows_B, key) -> {deletion_auc,
    insertion_auc}`` (``f32[B]`` each): neuron deletion / insertion curves by the scores,
    ties broken at random per row (``fold_in(key, rows_B[b])``)."""

    def fn(classifier, images, classes_B, scores_BxN, rows_B, key):
        scores = gates_lib.unflatten(scores_BxN, classifier.site_channels)
        logits_fn = lambda g: classifier.logits(images, g)
        curves = {
            mode: perturbation.perturbation_curve(
                logits_fn, scores, classes_B, mode, num_points, key, rows_B
            )
            for mode in perturbation.CURVE_MODES
        }
        return {f"{mode}_auc": perturbation.curve_auc(c) for mode, c in curves.items()}

    return jax.jit(fn)


def make_sanity_fn(s: Settings):
    """``fn(generator, random_classifier, images, gates_BxN) -> f32[B]``: per-instance IoU
    (`metrics.paired_iou_B`) of the trained generator's pathways read from the features of a
    weight-randomised classifier and the trained pathways ``gates_BxN`` (feature swap: the
    generator sees out-of-distribution features)."""

    def fn(generator, random_classifier, images, gates_BxN):
        _, features, fo = evidence.read(random_classifier, images, generator.reads_gradients)
        _, random_gates, _ = generator.pathway(features, s.daq, fo)
        return metrics.paired_iou_B(gates_BxN, gates_lib.flatten(random_gates))

    return jax.jit(fn)
