"""The evaluated methods behind one gates type (DESIGN §6) and the shared metric pass (§7).

Each method is a pure ``pathway_fn(params, batch) -> outputs`` that `evaluate` compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.eval import accumulator as metric_accumulator
from gencnp_jax.eval import baselines, metrics, perturbation
from gencnp_jax.method import class_bank as bank_lib
from gencnp_jax.models import classifiers, generator
from gencnp_jax.models import gates as gates_lib

PathwayFn = Callable[[dict, dict], dict]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Plain values the methods and the evaluation loop need (read from the config by `evaluate`).

    ``*_max_examples``: the first examples a costly part runs on (0 = all): CDRP (30 gradient
    steps each), IntGrad, the deletion / insertion AUCs (``2 * auc_points`` gated passes each),
    and the ``<method>_<other>_ablation`` entries.
    """

    daq_temperature: float = 2.0
    daq_sigma: float = 2.0
    cdrp_steps: int = 30
    cdrp_gamma: float = 0.01
    cdrp_lr: float = 0.1
    cdrp_momentum: float = 0.9
    cdrp_threshold: float = 0.5
    cdrp_max_examples: int = 500
    intgrad_steps: int = 16
    intgrad_max_examples: int = 1000
    auc_points: int = 11
    auc_max_examples: int = 500
    ablation_max_examples: int = 2000


@dataclasses.dataclass(frozen=True)
class Method:
    """One pathway finder.

    Attributes:
      name: the method's name.
      pathway_fn: ``(params, batch) -> {"scores": Gates, "gates": {variant: Gates}, ...}``.
        `params` holds ``cls, gen, bank, fills, key``; `batch` holds ``images, index,
        wrong_offset`` and, for matched methods, GEN-CNP's ``density`` and ``site_density``.
      variants: the result names its gates come under (e.g. ``cdrp`` and ``cdrp_matched``).
      max_examples: examples it runs on (0 = all).
      matched: whether it needs GEN-CNP's per-instance densities.
    """

    name: str
    pathway_fn: PathwayFn
    variants: tuple[str, ...]
    max_examples: int = 0
    matched: bool = False


def make_methods(
    cls_graphdef: nnx.GraphDef,
    gen_graphdef: nnx.GraphDef,
    site_channels: Mapping[str, int],
    s: Settings,
) -> list[Method]:
    """Every method, GEN-CNP first (the others are matched to its per-instance densities)."""
    site_channels = dict(site_channels)

    def gencnp(params, batch):
        full_logits_BxK, features = classifiers.forward(
            cls_graphdef, params["cls"], batch["images"]
        )
        scores, gates, _ = generator.explain_scores(
            gen_graphdef, params["gen"], features, s.daq_temperature, s.daq_sigma
        )
        return {"scores": scores, "gates": {"gencnp": gates}, "full_logits": full_logits_BxK}

    def gencnp_transfer(params, batch):
        bank = params["bank"]
        logits_BxK, _ = classifiers.forward(cls_graphdef, params["cls"], batch["images"])
        classes_B = jnp.argmax(logits_BxK, -1)
        # a wrong class for every sample: (c + 1 + r) mod K with r in [0, K-2] fixed per sample
        wrong_B = (classes_B + 1 + batch["wrong_offset"]) % bank.num_classes
        scores = {site: f[classes_B] for site, f in bank.freq.items()}  # F_c ranks neurons
        return {
            "scores": scores,
            "gates": {"gencnp_transfer": bank_lib.transfer(bank, classes_B)},
            "wrong_gates": bank_lib.transfer(bank, wrong_B),
            "wrong_classes": wrong_B,
        }

    def cdrp(params, batch):
        scores, gates = baselines.cdrp(
            cls_graphdef,
            params["cls"],
            batch["images"],
            s.cdrp_steps,
            s.cdrp_gamma,
            s.cdrp_lr,
            s.cdrp_momentum,
            s.cdrp_threshold,
            params["fills"],
        )
        matched = baselines.gates_at_density(scores, batch["density"])
        return {"scores": scores, "gates": {"cdrp": gates, "cdrp_matched": matched}}

    def neuron_mct(params, batch):
        scores, gates = baselines.neuron_mct(
            cls_graphdef, params["cls"], batch["images"], None, batch["density"], params["fills"]
        )
        return {"scores": scores, "gates": {"neuron_mct": gates}}

    def neuron_intgrad(params, batch):
        scores, gates = baselines.neuron_intgrad(
            cls_graphdef,
            params["cls"],
            batch["images"],
            None,
            batch["density"],
            s.intgrad_steps,
            params["fills"],
        )
        return {"scores": scores, "gates": {"neuron_intgrad": gates}}

    def random(params, batch):
        key = jax.random.fold_in(params["key"], batch["index"][0])
        scores, gates = baselines.random_pathway(key, site_channels, batch["site_density"])
        return {"scores": scores, "gates": {"random": gates}}

    def topk_activation(params, batch):
        scores, gates = baselines.topk_activation(
            cls_graphdef, params["cls"], batch["images"], batch["density"], params["fills"]
        )
        return {"scores": scores, "gates": {"topk_activation": gates}}

    return [
        Method("gencnp", gencnp, ("gencnp",)),
        Method("gencnp_transfer", gencnp_transfer, ("gencnp_transfer",)),
        Method("cdrp", cdrp, ("cdrp", "cdrp_matched"), s.cdrp_max_examples, matched=True),
        Method("neuron_mct", neuron_mct, ("neuron_mct",), matched=True),
        Method(
            "neuron_intgrad",
            neuron_intgrad,
            ("neuron_intgrad",),
            s.intgrad_max_examples,
            matched=True,
        ),
        Method("random", random, ("random",), matched=True),
        Method("topk_activation", topk_activation, ("topk_activation",), matched=True),
    ]


def make_metric_fn(cls_graphdef: nnx.GraphDef, num_points: int, with_auc: bool):
    """The jitted metric pass shared by every method and both ablations.

    ``fn(cls_state, fills, images, classes, valid, auc_valid, scores, gates, wrong=None)
    -> (per_instance, gates_flat)``, with ``classes`` the explained (predicted) classes.
    One gated forward over ``[x; x; x; x'; 0]`` with gates ``[1; P; 1 - P; P; P]`` gives the
    full, pathway, complement (necessity), partner (leakage; ``x'`` the next sample of another
    class) and null-image logits. The full model shares the pathway's program, so an all-open
    pathway reproduces its logits bit for bit (separately compiled programs differ by float
    noise, which mIC would count as increases). With `with_auc`, neuron deletion / insertion
    curves by `scores` (weights `auc_valid`). ``wrong = (gates, classes)``: a wrong class's
    pathway per sample, for ``class_leakage`` and ``other_class_drop`` (one more block of rows).
    """

    def fn(cls_state, fills, images, classes_B, valid_B, auc_valid_B, scores, gates, wrong=None):
        ones = jax.tree.map(jnp.ones_like, gates)
        partner_B, has_partner_B = metrics.different_class_partners(classes_B, valid_B)
        image_blocks = [images, images, images, images[partner_B], jnp.zeros_like(images)]
        gate_blocks = [ones, gates, gates_lib.complement(gates), gates, gates]
        if wrong is not None:
            image_blocks.append(images)
            gate_blocks.append(wrong[0])
        logits = classifiers.forward(
            cls_graphdef,
            cls_state,
            jnp.concatenate(image_blocks),
            jax.tree.map(lambda *g: jnp.concatenate(g), *gate_blocks),
            fills,
        )[0]
        full, path, comp, part, null, *rest = jnp.split(logits, len(image_blocks))
        aucs = {}
        if with_auc:
            logits_fn = lambda g: classifiers.forward(cls_graphdef, cls_state, images, g, fills)[0]
            for mode in perturbation.CURVE_MODES:
                curve = perturbation.perturbation_curve(
                    logits_fn, scores, classes_B, mode, num_points
                )
                aucs[f"{mode}_auc_B"] = perturbation.curve_auc(curve)
        per = metric_accumulator.instance_metrics(
            full,
            path,
            gates,
            classes_B,
            valid_B,
            complement_logits_BxK=comp,
            partner_logits_BxK=part,
            partner_classes_B=jnp.where(has_partner_B, classes_B[partner_B], classes_B),
            null_logits_BxK=null,
            **aucs,
        )
        for name in ("deletion_auc", "insertion_auc"):
            if name in per:
                per[name] = (per[name][0], auc_valid_B)
        if wrong is not None:
            other = metric_accumulator.instance_metrics(
                full, rest[0], None, classes_B, valid_B, pathway_classes_B=wrong[1]
            )
            per.update({k: other[k] for k in ("class_leakage", "other_class_drop")})
        return per, gates_lib.flatten(gates)

    return jax.jit(fn)


def make_sanity_fn(cls_graphdef: nnx.GraphDef, gen_graphdef: nnx.GraphDef, s: Settings):
    """``fn(gen_state, random_cls_state, images, gates) -> f32[B]``: per-instance IoU of GEN-CNP
    pathways read from a weight-randomised classifier and the trained one's `gates`.
    """

    def fn(gen_state, random_cls_state, images, gates):
        _, features = classifiers.forward(cls_graphdef, random_cls_state, images)
        _, random_gates, _ = generator.explain_scores(
            gen_graphdef, gen_state, features, s.daq_temperature, s.daq_sigma
        )
        sites = sorted(gates)
        a_BxN, b_BxN = gates_lib.flatten(gates, sites), gates_lib.flatten(random_gates, sites)
        inter_B, union_B = jnp.sum(a_BxN * b_BxN, -1), jnp.sum(jnp.maximum(a_BxN, b_BxN), -1)
        return jnp.where(union_B > 0, inter_B / jnp.maximum(union_B, 1.0), 1.0)

    return jax.jit(fn)
