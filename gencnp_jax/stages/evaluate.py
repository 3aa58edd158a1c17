"""Evaluates GEN-CNP, its class pathways, the baselines and the controls (docs/METHOD.md §6-7).

Writes `WORKDIR/eval/results.json` and `WORKDIR/eval/results.md` (launch.py ``--mode=evaluate``).
Every method runs on one common subset of the test split (the first ``eval.num_examples``),
at fixed densities ``eval.densities`` (the top ``round(d N)`` of all N channels by the method's
scores, ties broken at random) and at its own density, under each of ``eval.ablations`` (the
first is the headline).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import baselines, controls
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.stages import build_bank
from gencnp_jax.stages import evaluate_passes as passes

AT_DENSITY_KEYS = ("mDC", "mIC", "agreement", "leakage", "class_leakage", "density_mean")
AT_DENSITY_KEYS += ("acIOU", "inter_class_iou")
CLASS_TABLES = ("gencnp_transfer", "constant_gencnp_score", "constant_mct_score")
CLASS_TABLES += ("class_constant_gencnp_score", "class_constant_mct_score")


def settings_from_config(config) -> eval_methods.Settings:
    """The plain method settings of `config` (eval fields it lacks keep their defaults)."""
    e, g = config.eval, config.generator
    names = {f.name for f in eval_methods.dataclasses.fields(eval_methods.Settings)}
    given = {k: e[k] for k in names if k in e}
    return eval_methods.Settings(daq_temperature=g.daq.temperature, daq_sigma=g.daq.sigma, **given)


def _tables(bank, control: dict, classes_K: int) -> dict:
    """``name -> f32[K, N]`` class-indexed score tables (a row per class: its mask's ranking)."""
    out = {"gencnp_transfer": bank.ranking()}
    for source, (mean_N, mean_KxN) in control.items():
        out[f"constant_{source}"] = np.tile(mean_N, (classes_K, 1))
        out[f"class_constant_{source}"] = mean_KxN
    return out


def _masks(run, name, table_KxN, density) -> np.ndarray:
    """Class masks ``f32[K, N]`` at `density`; the constant's rows are one mask (row 0's)."""
    key = run.key("mask", name, density)
    if name.startswith("constant_"):
        row = np.asarray(controls.constant_mask(table_KxN[0], density, key))
        return np.tile(row, (len(table_KxN), 1))
    return np.asarray(controls.class_masks(table_KxN, density, key))


def _gates(run, ctx, name, density):
    """``(gates_BxN, wrong)`` of method `name` at `density` (a float, or "own")."""
    classes_B, wrong_B = ctx["classes"], ctx["wrong_classes"]
    own = density == "own"
    if name in CLASS_TABLES:
        if own:
            masks_KxN = np.asarray(gates_lib.flatten(ctx["bank"].masks))
            if name != "gencnp_transfer":
                masks_KxN = _masks(run, name, ctx["tables"][name], ctx["gencnp_density"])
        else:
            masks_KxN = _masks(run, name, ctx["tables"][name], density)
        return masks_KxN[classes_B], (masks_KxN[wrong_B], wrong_B)
    scores_BxN = ctx["scores"][name]
    if name == "random":
        sites = run.classifier.site_channels
        if own:  # GEN-CNP's per-instance density at every site
            scores = gates_lib.unflatten(jnp.asarray(scores_BxN), sites)
            site_d = {s: jnp.asarray(v) for s, v in ctx["site_density"].items()}
            gates = baselines.gates_at_site_density(scores, site_d, run.key("random_own"))
            return np.asarray(gates_lib.flatten(gates)), None
        wrong = passes.top_k(ctx["scores"]["random_wrong"], density, run.key("random_wrong"))
        return passes.top_k(scores_BxN, density, run.key(name, density)), (wrong, wrong_B)
    if own:
        if name in ctx["own_gates"]:
            return ctx["own_gates"][name], None
        return passes.top_k(scores_BxN, ctx["density_B"], run.key(name, "own")), None
    return passes.top_k(scores_BxN, density, run.key(name, density)), None


def _rank_scores(ctx, name) -> np.ndarray | None:
    """The per-instance scores that rank `name`'s channels for the AUCs (None: controls)."""
    if name in ctx["scores"]:
        return ctx["scores"][name]
    return ctx["tables"][name][ctx["classes"]] if name == "gencnp_transfer" else None


def _pick_controls(at: dict, by: str) -> dict:
    """Adds ``constant`` and ``class_constant``: per density the source with the lower mDC
    under ablation `by` (`controls.better_source`), the same source under every ablation."""
    sources = {}
    for d in at[by]:
        for kind in ("constant", "class_constant"):
            mdc = {src: at[by][d][f"{kind}_{src}"]["mDC"] for src in ("gencnp_score", "mct_score")}
            sources.setdefault(kind, {})[d] = controls.better_source(mdc)
    for per_density in at.values():
        for d, row in per_density.items():
            for kind in ("constant", "class_constant"):
                src = sources[kind][d]
                row[kind] = {**row[f"{kind}_{src}"], f"{kind}_source": src}
    return sources


def _evaluate_all(run, ctx, names, ablations, densities, s) -> tuple[dict, dict]:
    """``(at_density, own_density)``: every method's metrics at each density and ablation."""
    sites = run.classifier.site_channels
    metric_fns = {x: eval_methods.make_metric_fn(run.classifier.graphdef, sites, x) for x in (0, 1)}
    auc_fn = eval_methods.make_auc_fn(run.classifier.graphdef, sites, s.auc_points)
    at, own = {}, {}
    bar = writers.progress(len(ablations) * (len(densities) + 1) * len(names), desc="evaluate")
    for abl in ablations:
        fills = ctx["fills"][abl]
        at[abl] = {}
        for d in densities:
            at[abl][str(d)] = {}
            for name in names:
                bar.set_postfix_str(f"{abl} ablation, density {d}, {name}", refresh=False)
                bar.update(1)
                gates_BxN, wrong = _gates(run, ctx, name, d)
                m = passes.metric_pass(
                    run,
                    metric_fns[0],
                    fills,
                    ctx["images"],
                    ctx["classes"],
                    gates_BxN,
                    wrong,
                    ctx["full_logits"],  # sparse masks: the ungated program's logits will do
                )
                at[abl][str(d)][name] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
        own[abl] = {}
        for name in names:
            bar.set_postfix_str(f"{abl} ablation, own density, {name}", refresh=False)
            bar.update(1)
            gates_BxN, wrong = _gates(run, ctx, name, "own")
            own[abl][name] = passes.metric_pass(
                run, metric_fns[1], fills, ctx["images"], ctx["classes"], gates_BxN, wrong
            )
            scores = _rank_scores(ctx, name)
            if abl == ablations[0] and scores is not None and ctx["auc_n"] > 0:
                n, key = ctx["auc_n"], run.key("auc", name)
                args = (ctx["images"][:n], ctx["classes"][:n], scores[:n], key)
                own[abl][name].update(passes.auc_pass(run, auc_fn, fills, *args))
            own[abl][name]["num_examples_auc"] = ctx["auc_n"] if abl == ablations[0] else 0
    bar.close()
    return at, own


def _gains(row: dict) -> dict:
    """``method -> mDC(class_constant) / mDC(method)`` at one density."""
    return {
        nm: controls.specificity_gain(row["class_constant"]["mDC"], m["mDC"])
        for nm, m in row.items()
    }


def _per_density(at: dict, fn) -> dict:
    return {abl: {d: fn(row) for d, row in per.items()} for abl, per in at.items()}


def evaluate(config, workdir: str) -> dict:
    """Evaluates every method and control; writes ``WORKDIR/eval/results.{json,md}``.

    Returns:
      The results dict written to results.json (NaN written as null); keys documented in
      docs and in `evaluate_passes.results_table`.
    """
    t0, e, s = time.time(), config.eval, settings_from_config(config)
    test = inputs.load_data(config, "test")
    n = min(len(test.labels), e.num_examples or len(test.labels))
    classifier = loading.load_classifier(config, workdir)
    gen_graphdef, gen_state, _, means = loading.load_generator(config, workdir, classifier)
    bank = build_bank.load_bank(config, workdir, classifier)
    mesh = inputs.make_mesh(config)
    run = passes.Run(config, mesh, e.batch_size, classifier, config.seed)
    zeros = {k: np.zeros((c,), np.float32) for k, c in classifier.site_channels.items()}
    fills = {"zero": zeros, "mean": {k: np.asarray(v, np.float32) for k, v in means.items()}}
    ablations, densities = tuple(e.ablations), tuple(float(d) for d in e.densities)
    params = {"cls": classifier.state, "gen": gen_state, "fills": fills[ablations[0]]}
    score_fns = eval_methods.make_score_fns(classifier.graphdef, gen_graphdef, s)
    images = test.images[:n]
    scores, own_gates, seconds = {}, {}, {}
    for name, fn in score_fns.items():
        out, seconds[name] = passes.score_pass(run, fn, params, images, f"evaluate: {name} scores")
        scores[name] = out["scores"]
        if "gates" in out:
            own_gates[name] = out["gates"]
        if name == "gencnp":
            full_logits = out["full_logits"]
    k = classifier.num_classes
    classes = full_logits.argmax(-1).astype(np.int32)
    n_all = sum(classifier.site_channels.values())
    key = run.key("random_scores")
    scores["random"] = np.asarray(jax.random.uniform(key, (n, n_all)))
    scores["random_wrong"] = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (n, n_all)))
    train = inputs.load_data(config, "train")
    control = passes.control_tables(run, score_fns, params, train.images[: e.control_examples], k)
    offset = np.random.default_rng(config.seed).integers(0, max(k - 1, 1), n)
    gates = gates_lib.unflatten(jnp.asarray(own_gates["gencnp"]), classifier.site_channels)
    ctx = {
        "images": images,
        "classes": classes,
        "full_logits": full_logits,
        "wrong_classes": ((classes + 1 + offset) % k).astype(np.int32),
        "scores": scores,
        "own_gates": own_gates,
        "density_B": own_gates["gencnp"].mean(-1),
        "gencnp_density": float(own_gates["gencnp"].mean()),
        "site_density": {st: np.asarray(v) for st, v in gates_lib.site_density(gates).items()},
        "bank": bank,
        "tables": _tables(bank, control, k),
        "fills": fills,
        "auc_n": min(n, e.auc_examples) if e.auc_examples else n,
    }
    names = ("gencnp", "gencnp_transfer", *eval_methods.SCORED[1:], "random", *CLASS_TABLES[1:])
    at, own = _evaluate_all(run, ctx, names, ablations, densities, s)
    by = "mean" if "mean" in ablations else ablations[0]
    sources = _pick_controls(at, by)
    own_sources = {}
    for kind in ("constant", "class_constant"):
        mdc = {src: own[by][f"{kind}_{src}"]["mDC"] for src in ("gencnp_score", "mct_score")}
        own_sources[kind] = src = controls.better_source(mdc)
        for rows in own.values():
            rows[kind] = {**rows[f"{kind}_{src}"], f"{kind}_source": src}
    for name, sec in seconds.items():
        for rows in own.values():
            rows[name]["seconds_per_image"] = sec
    # p_c of the full classifier on the all-zero (normalised-mean) image, c each test prediction
    zero_image = jnp.zeros_like(inputs.normalize(config, images[:1]))
    null_logits_1xK = classifiers.forward(classifier.graphdef, classifier.state, zero_image)[0]
    null_conf = float(np.mean(np.asarray(jax.nn.softmax(null_logits_1xK[0]))[classes]))
    scored = {**scores, "gencnp_gates": own_gates["gencnp"]}
    sanity = passes.sanity(
        run, s, gen_graphdef, gen_state, fills[ablations[0]], images, scored, densities
    )
    head, others = ablations[0], ablations[1:]
    site_density = {  # per-site densities move out of the metric rows
        nm: {k.split("/", 1)[1]: m.pop(k) for k in list(m) if k.startswith("density/")}
        for rows in own.values()
        for nm, m in rows.items()
    }
    methods = {name: {**own[head][name], "num_examples": n} for name in own[head]}
    for other in others:
        methods.update({f"{nm}_{other}_ablation": own[other][nm] for nm in own[other]})
    results = passes.none_for_nan(
        {
            "split": "test",
            "num_examples": n,
            "methods": methods,
            "site_density": site_density,
            "at_density": at,
            "own_density": own,
            "specificity_gain": _per_density(at, _gains),
            "random_reference": _per_density(
                at, lambda row: {x: row["random"].get(x) for x in ("leakage", "class_leakage")}
            ),
            "constant_source": {**sources, "own": own_sources},
            "null_confidence_full_model": null_conf,
            "sanity": sanity,
            "sanity_iou": sanity["gencnp_retrained_iou"],
            "config": {
                "densities": list(densities),
                "ablations": list(ablations),
                "num_examples": n,
                "control_examples": min(len(train.labels), e.control_examples),
                "auc_examples": ctx["auc_n"],
                "sanity_steps": e.sanity_steps,
                "sanity_pio_images": e.sanity_pio_images,
                "seed": config.seed,
                "batch_size": e.batch_size,
                "generator_ablation": config.generator.ablation,
                **eval_methods.dataclasses.asdict(s),
            },
            "seconds": round(time.time() - t0, 2),
        }
    )
    out_dir = workdir_lib.eval_dir(workdir)
    writers.write_text(os.path.join(out_dir, "results.md"), passes.results_table(results))
    writers.write_json(os.path.join(out_dir, "results.json"), results)
    return results
