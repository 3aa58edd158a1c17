"""Evaluates GEN-CNP, its class pathways and the baselines on the test split (DESIGN §6-7).

Writes `WORKDIR/eval/results.json` and `WORKDIR/eval/results.md` (launch.py ``--mode=evaluate``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np

from gencnp_jax.eval import accumulator as metric_accumulator
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.eval import perturbation
from gencnp_jax.io import data, sharding
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.stages import build_bank, context, explainer
from gencnp_jax.viz import html as report

OTHER_ABLATION = {"zero": "mean", "mean": "zero"}


def settings_from_config(config) -> eval_methods.Settings:
    """The plain settings of `config`; eval fields the config lacks keep their defaults."""
    e, g = config.eval, config.generator
    names = {f.name for f in dataclasses.fields(eval_methods.Settings)}
    given = {k: e[k] for k in names if k in e}
    return eval_methods.Settings(daq_temperature=g.daq.temperature, daq_sigma=g.daq.sigma, **given)


@dataclasses.dataclass
class _Run:
    """What every method's loop shares. `host` holds GEN-CNP's per-example outputs (the first
    method fills it; the matched methods read it): full_logits, density, site_density."""

    mesh: jax.sharding.Mesh
    normalize: object
    images_uint8: np.ndarray
    batch_size: int
    auc_examples: int
    ablations: dict  # result-name suffix -> (placed fills, examples); "" = the config's ablation
    params: dict
    metric_fns: dict  # with_auc -> jitted metric pass
    sanity_fn: object
    random_cls_state: object
    host: dict
    num_classes: int
    sanity: list = dataclasses.field(default_factory=list)

    def shard(self, tree):
        return jax.tree.map(lambda a: sharding.shard_batch(self.mesh, np.asarray(a)), tree)


def _batch(run: _Run, idx: np.ndarray, matched: bool) -> dict:
    batch = {
        "images": run.normalize(run.images_uint8[idx]),
        "index": idx.astype(np.int32),
        "wrong_offset": run.host["wrong_offset"][idx],
    }
    if matched:
        batch["density"] = run.host["density"][idx]
        batch["site_density"] = {s: v[idx] for s, v in run.host["site_density"].items()}
    return run.shard(batch)


def _record_gencnp(run: _Run, idx, valid, out, images) -> None:
    """Keeps GEN-CNP's logits and densities per example, and its sanity-check IoU."""
    gates, rows = out["gates"]["gencnp"], idx[:valid]
    host = sharding.to_host({"logits": out["full_logits"], "gates": gates})
    run.host["full_logits"][rows] = host["logits"][:valid]
    for site, g in host["gates"].items():
        run.host["site_density"][site][rows] = g[:valid].mean(-1)
    flat = np.concatenate([host["gates"][s][:valid] for s in sorted(gates)], -1)
    run.host["density"][rows] = flat.mean(-1)
    iou_B = run.sanity_fn(run.params["gen"], run.random_cls_state, images, gates)
    run.sanity.append(np.asarray(sharding.to_host(iou_B))[:valid])


def _run_method(run: _Run, method: eval_methods.Method, num_examples: int) -> dict:
    """One method over its examples: ``{result name: metrics}`` per variant and ablation (the
    gates are computed once; each ablation redoes only the gated passes)."""
    n = min(num_examples, method.max_examples or num_examples)
    accs = {
        v + sfx: metric_accumulator.MetricAccumulator(run.num_classes)
        for v in method.variants
        for sfx in run.ablations
    }
    compiled, seconds = None, 0.0
    bar = logging_utils.progress(n, desc=f"evaluate {method.name}")
    for idx, valid in data.eval_batches(n, run.batch_size):
        batch = _batch(run, idx, method.matched)
        if compiled is None:  # compiled ahead of time: the timings below exclude compiling
            compiled = jax.jit(method.pathway_fn).lower(run.params, batch).compile()
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(run.params, batch))
        seconds += time.perf_counter() - start
        if method.name == "gencnp":
            _record_gencnp(run, idx, valid, out, batch["images"])
        classes_B = run.host["full_logits"][idx].argmax(-1).astype(np.int32)
        wrong = (out["wrong_gates"], out["wrong_classes"]) if "wrong_gates" in out else None
        for sfx, (fills, limit) in run.ablations.items():
            if idx[0] >= limit:
                continue
            valid_B = ((np.arange(len(idx)) < valid) & (idx < limit)).astype(np.float32)
            placed = run.shard((classes_B, valid_B, valid_B * (idx < run.auc_examples)))
            metric_fn = run.metric_fns[bool(idx[0] < run.auc_examples)]
            for variant, gates in out["gates"].items():
                per, flat = metric_fn(
                    run.params["cls"], fills, batch["images"], *placed, out["scores"], gates, wrong
                )
                accs[variant + sfx].add(*sharding.to_host((per, flat)), classes_B, valid_B)
        bar.update(valid)
    bar.close()
    limits = {v + sfx: lim for v in method.variants for sfx, (_, lim) in run.ablations.items()}
    results = {}
    for name, acc in accs.items():
        used = min(n, limits[name])
        results[name] = {
            **acc.result(),
            "num_examples": used,
            "num_examples_auc": min(used, run.auc_examples),
            "seconds_per_image": seconds / max(n, 1),
        }
    return results


def _cap(n: int, cap: int) -> int:
    return min(n, cap) if cap else n


def _setup(config, workdir: str, num_examples: int, test, s: eval_methods.Settings):
    """`(run, gen_graphdef, classifier)`: everything loaded and placed on the mesh."""
    classifier = context.load_classifier(config, workdir)
    gen_graphdef, gen_state, _, means = explainer.load_generator(config, workdir, classifier)
    class_bank = build_bank.load_bank(config, workdir, classifier)
    mesh = context.make_mesh(config)
    sharding.check_batch_size(mesh, config.eval.batch_size)
    zeros = {site: np.zeros((c,), np.float32) for site, c in classifier.site_channels.items()}
    fills = {"zero": zeros, "mean": {k: np.asarray(v, np.float32) for k, v in means.items()}}
    main, other = config.generator.ablation, OTHER_ABLATION[config.generator.ablation]
    params = sharding.replicate(
        mesh,
        {
            "cls": classifier.state,
            "gen": gen_state,
            "bank": class_bank,
            "fills": fills[main],
            "key": jax.random.key(config.seed + 11),
        },
    )
    k = classifier.num_classes
    host = {
        "full_logits": np.zeros((num_examples, k), np.float32),
        "density": np.zeros((num_examples,), np.float32),
        "site_density": {
            site: np.zeros((num_examples,), np.float32) for site in classifier.site_channels
        },
        # the wrong class of a sample for transfer: (c + 1 + r) mod K, r fixed per sample
        "wrong_offset": np.random.default_rng(config.seed)
        .integers(0, max(k - 1, 1), num_examples)
        .astype(np.int32),
    }
    run = _Run(
        mesh=mesh,
        normalize=lambda x: context.normalize(config, x),
        images_uint8=test.images[:num_examples],
        batch_size=config.eval.batch_size,
        auc_examples=_cap(num_examples, s.auc_max_examples),
        ablations={
            "": (params["fills"], num_examples),
            f"_{other}_ablation": (
                sharding.replicate(mesh, fills[other]),
                _cap(num_examples, s.ablation_max_examples),
            ),
        },
        params=params,
        metric_fns={
            w: eval_methods.make_metric_fn(classifier.graphdef, s.auc_points, w)
            for w in (False, True)
        },
        sanity_fn=eval_methods.make_sanity_fn(classifier.graphdef, gen_graphdef, s),
        random_cls_state=sharding.replicate(
            mesh, perturbation.randomize_weights(classifier.state, config.seed + 13)
        ),
        host=host,
        num_classes=k,
    )
    return run, gen_graphdef, classifier


def _none_for_nan(tree):
    if isinstance(tree, dict):
        return {k: _none_for_nan(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_none_for_nan(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def results_table(results: dict) -> str:
    """The Markdown table of `results` (`report.results_markdown`)."""
    table = {k: results[k] for k in ("split", "num_examples", "sanity_iou", "methods")}
    return report.results_markdown(table)


def evaluate(config, workdir: str) -> dict:
    """Evaluates every method on the test split and writes ``WORKDIR/eval/results.{json,md}``.

    Methods: ``gencnp``, ``gencnp_transfer`` (class pathways of the predicted class; a wrong
    class ``(c + 1 + r) mod K`` for class_leakage / other_class_drop), ``cdrp`` (its own
    threshold) and ``cdrp_matched``, ``neuron_mct``, ``neuron_intgrad``, ``random`` and
    ``topk_activation`` (each instance at GEN-CNP's density; random at its per-site density).
    Each also as ``<method>_<other>_ablation``: the same gates, closed gates filled with the
    other ablation value (mean if the generator was trained with zero ablation, else zero).
    The costly parts run on the first ``config.eval.*_max_examples`` examples (see
    `eval_methods.Settings`); each entry records its ``num_examples`` and ``num_examples_auc``.

    Returns:
      The results dict written to results.json (NaN written as null).
    """
    t0 = time.time()
    test = context.load_data(config, "test")
    num_examples = _cap(len(test.labels), config.eval.max_examples)
    s = settings_from_config(config)
    run, gen_graphdef, classifier = _setup(config, workdir, num_examples, test, s)
    methods = {}
    for method in eval_methods.make_methods(
        classifier.graphdef, gen_graphdef, classifier.site_channels, s
    ):
        methods.update(_run_method(run, method, num_examples))
    site_density = {
        name: {k.split("/", 1)[1]: m.pop(k) for k in list(m) if k.startswith("density/")}
        for name, m in methods.items()
    }
    results = _none_for_nan(
        {
            "split": "test",
            "num_examples": num_examples,
            "methods": methods,
            "site_density": site_density,
            "sanity_iou": float(np.mean(np.concatenate(run.sanity))),
            "config": {
                "max_examples": config.eval.max_examples,
                "batch_size": config.eval.batch_size,
                **dataclasses.asdict(s),
                "ablation": config.generator.ablation,
                "other_ablation": OTHER_ABLATION[config.generator.ablation],
                "bank": {
                    k: config.bank[k] for k in ("samples_per_class", "threshold", "class_source")
                },
            },
            "seconds": round(time.time() - t0, 2),
        }
    )
    out_dir = workdir_lib.eval_dir(workdir)
    logging_utils.write_text(os.path.join(out_dir, "results.md"), results_table(results))
    logging_utils.write_json(os.path.join(out_dir, "results.json"), results)
    return results
