"""Evaluates GEN-CNP, its class pathways, the baselines and the controls (docs/METHOD.md §6-7).

Writes `WORKDIR/eval/results.json` and `WORKDIR/eval/results.md` (launch.py ``--mode=evaluate``).
Every method runs on one common subset of the test split (the first ``eval.num_examples``),
at fixed densities ``eval.densities`` (the top ``round(d N)`` of all N channels by the method's
scores, ties broken at random) and at its own density, under each of ``eval.ablations`` (the
first is the headline).

Five named phases, each a function, pass frozen records on:
`score` (every method's scores on the subset) -> `class_tables` (the controls' and the class
pathways' one-mask-per-class tables) -> `fixed_densities` (every mask through the metric
pass, at each density and ablation) -> `sanity` (model randomisation) -> `assemble`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import baselines, controls, metrics, perturbation
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.io import batched, sharding, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import explain
from gencnp_jax.method.class_bank import ClassBank
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.stages import build_bank
from gencnp_jax.stages import evaluate_passes as passes
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator as train_generator

AT_DENSITY_KEYS = ("mDC", "mIC", "agreement", "leakage", "class_leakage", "density_mean")
AT_DENSITY_KEYS += ("acIOU", "inter_class_iou")
CLASS_TABLES = ("gencnp_transfer", "constant_gencnp_score", "constant_mct_score")
CLASS_TABLES += ("class_constant_gencnp_score", "class_constant_mct_score")
CONTROL_SOURCES = ("gencnp_score", "mct_score")


def settings_from_config(config) -> eval_methods.Settings:
    """The methods' settings of `config`."""
    e, d = config.eval, config.generator.daq
    return eval_methods.Settings(
        daq=daq.Settings.create(d.temperature, d.sigma),
        cdrp=baselines.CdrpSettings(
            steps=int(e.cdrp_steps),
            gamma=float(e.cdrp_gamma),
            lr=float(e.cdrp_lr),
            momentum=baselines.CDRP_MOMENTUM,
            threshold=baselines.CDRP_THRESHOLD,
        ),
        intgrad_steps=int(e.intgrad_steps),
        auc_points=perturbation.AUC_POINTS,
    )


@dataclasses.dataclass(frozen=True)
class Subset:
    """The common test subset every method is scored on.

    Attributes:
      images: ``u8[n, H, W, C]``.
      classes: ``i32[n]``, the full model's predictions (the explained classes).
      wrong_classes: ``i32[n]``, one wrong class per image (the class pathways' transfer).
      full_logits: ``f32[n, K]`` of the full model.
    """

    images: np.ndarray
    classes: np.ndarray
    wrong_classes: np.ndarray
    full_logits: np.ndarray


@dataclasses.dataclass(frozen=True)
class Scores:
    """Phase 1: every per-instance method's scores on the subset.

    Attributes:
      per_method: ``name -> f32[n, N]`` scores that rank the channels (with ``random`` and the
        ``random_wrong`` of its transfer row).
      own_gates: ``name -> f32[n, N]`` gates of the methods with a density of their own.
      seconds_per_image: ``name -> seconds`` of each score pass (compilation excluded).
    """

    per_method: dict[str, np.ndarray]
    own_gates: dict[str, np.ndarray]
    seconds_per_image: dict[str, float]

    @property
    def gencnp_density_B(self) -> np.ndarray:
        return self.own_gates["gencnp"].mean(-1)

    def site_density(self, site_channels) -> dict[str, np.ndarray]:
        """GEN-CNP's per-instance density at each site (the random baseline's own density)."""
        gates = gates_lib.unflatten(jnp.asarray(self.own_gates["gencnp"]), site_channels)
        return {s: np.asarray(v) for s, v in gates_lib.site_density(gates).items()}


@dataclasses.dataclass(frozen=True)
class ClassTables:
    """Phase 2: one score row per class, whose top-d is that class's mask at density d.

    Attributes:
      tables: ``name -> f32[K, N]`` for every name of `CLASS_TABLES`.
      bank: the class-pathway bank (its own masks are ``gencnp_transfer``'s own density).
    """

    tables: dict[str, np.ndarray]
    bank: ClassBank


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the phases share: the run, the subset, the ablations' fills and the settings."""

    run: passes.Run
    subset: Subset
    fills: dict[str, dict | None]  # ablation -> fills (None: zero)
    ablations: tuple[str, ...]
    densities: tuple[float, ...]
    settings: eval_methods.Settings
    auc_examples: int

    def classifier(self, ablation: str):
        return self.run.classifier.with_fills(self.fills[ablation])


def score(run: passes.Run, classifier, images, score_fns) -> tuple[Scores, np.ndarray]:
    """Phase 1: every method's scores on `images`, `classifier`'s fills the ablation they
    assume (the headline's), and the full model's logits.

    Returns:
      ``(scores, full_logits_nxK)``: GEN-CNP's pass also gives the full model's logits.
    """
    per_method, own_gates, seconds = {}, {}, {}
    for name, fn in score_fns.items():
        models = (run.generator, classifier)
        out, seconds[name] = passes.score_pass(run, fn, models, images, f"evaluate: {name} scores")
        per_method[name] = out["scores"]
        if "gates" in out:
            own_gates[name] = out["gates"]
        if name == "gencnp":
            full_logits = out["full_logits"]
    n, n_all = len(images), run.classifier.num_neurons
    key = run.key("random_scores")
    per_method["random"] = np.asarray(jax.random.uniform(key, (n, n_all)))
    per_method["random_wrong"] = np.asarray(
        jax.random.uniform(jax.random.fold_in(key, 1), (n, n_all))
    )
    return Scores(per_method, own_gates, seconds), full_logits


def class_tables(ev: Evaluation, score_fns, bank: ClassBank, train_images) -> ClassTables:
    """Phase 2: the class pathways' ranking and the controls' training-set mean scores."""
    k = ev.run.classifier.num_classes
    control = passes.control_tables(
        ev.run, score_fns, ev.classifier(ev.ablations[0]), train_images, k
    )
    tables = {"gencnp_transfer": bank.ranking()}
    for source, (mean_N, mean_KxN) in control.items():
        tables[f"constant_{source}"] = np.tile(mean_N, (k, 1))
        tables[f"class_constant_{source}"] = mean_KxN
    return ClassTables(tables, bank)


def _class_masks(ev: Evaluation, name: str, table_KxN, density) -> np.ndarray:
    """Class masks ``f32[K, N]`` at `density`; the constant's rows are one mask (row 0's)."""
    key = ev.run.key("mask", name, density)
    if name.startswith("constant_"):
        row = np.asarray(controls.constant_mask(table_KxN[0], density, key))
        return np.tile(row, (len(table_KxN), 1))
    return np.asarray(controls.class_masks(table_KxN, density, key))


def masks_of(ev: Evaluation, scores: Scores, tables: ClassTables, name: str, density):
    """The `passes.Masks` of method `name` at `density` (a float, or "own")."""
    classes_B, wrong_B = ev.subset.classes, ev.subset.wrong_classes
    own = density == "own"
    if name in CLASS_TABLES:
        if own and name == "gencnp_transfer":
            masks_KxN = np.asarray(gates_lib.flatten(tables.bank.masks))
        else:
            at = float(scores.own_gates["gencnp"].mean()) if own else density
            masks_KxN = _class_masks(ev, name, tables.tables[name], at)
        return passes.Masks(masks_KxN[classes_B], (masks_KxN[wrong_B], wrong_B))
    scores_BxN = scores.per_method[name]
    if name == "random":
        if own:  # GEN-CNP's per-instance density at every site
            sites = ev.run.classifier.site_channels
            ranked = gates_lib.unflatten(jnp.asarray(scores_BxN), sites)
            site_d = {s: jnp.asarray(v) for s, v in scores.site_density(sites).items()}
            gates = baselines.gates_at_site_density(ranked, site_d, ev.run.key("random_own"))
            return passes.Masks(np.asarray(gates_lib.flatten(gates)))
        wrong_scores = scores.per_method["random_wrong"]
        wrong = passes.top_k(wrong_scores, density, ev.run.key("random_wrong"))
        gates = passes.top_k(scores_BxN, density, ev.run.key(name, density))
        return passes.Masks(gates, (wrong, wrong_B))
    if own:
        if name in scores.own_gates:
            return passes.Masks(scores.own_gates[name])
        matched = passes.top_k(scores_BxN, scores.gencnp_density_B, ev.run.key(name, "own"))
        return passes.Masks(matched)
    return passes.Masks(passes.top_k(scores_BxN, density, ev.run.key(name, density)))


def _rank_scores(ev: Evaluation, scores: Scores, tables: ClassTables, name) -> np.ndarray | None:
    """The per-instance scores that rank `name`'s channels for the AUCs (None: controls)."""
    if name in scores.per_method:
        return scores.per_method[name]
    if name == "gencnp_transfer":
        return tables.tables[name][ev.subset.classes]
    return None


def fixed_densities(ev: Evaluation, scores: Scores, tables: ClassTables, names) -> tuple:
    """Phase 3: ``(at_density, own_density)``, every method's metrics at each fixed density and
    at its own, under each ablation (AUCs under the headline ablation only)."""
    metric_fns = {extra: eval_methods.make_metric_fn(extra) for extra in (False, True)}
    auc_fn = eval_methods.make_auc_fn(ev.settings.auc_points)
    at, own = {}, {}
    steps = len(ev.ablations) * (len(ev.densities) + 1) * len(names)
    bar = writers.progress(steps, desc="evaluate")
    for abl in ev.ablations:
        classifier = ev.classifier(abl)
        at[abl] = {}
        for d in ev.densities:
            at[abl][str(d)] = {}
            for name in names:
                bar.set_postfix_str(f"{abl} ablation, density {d}, {name}", refresh=False)
                bar.update(1)
                masks = masks_of(ev, scores, tables, name, d)
                m = passes.metric_pass(
                    ev.run,
                    metric_fns[False],
                    classifier,
                    ev.subset,
                    masks,
                    ev.subset.full_logits,  # sparse masks: the ungated program's logits will do
                )
                at[abl][str(d)][name] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
        own[abl] = {}
        for name in names:
            bar.set_postfix_str(f"{abl} ablation, own density, {name}", refresh=False)
            bar.update(1)
            masks = masks_of(ev, scores, tables, name, "own")
            own[abl][name] = passes.metric_pass(
                ev.run, metric_fns[True], classifier, ev.subset, masks
            )
            rank = _rank_scores(ev, scores, tables, name)
            headline = abl == ev.ablations[0]
            if headline and rank is not None and ev.auc_examples > 0:
                n = ev.auc_examples
                first = dataclasses.replace(
                    ev.subset, images=ev.subset.images[:n], classes=ev.subset.classes[:n]
                )
                key = ev.run.key("auc", name)
                own[abl][name].update(
                    passes.auc_pass(ev.run, auc_fn, classifier, first, rank[:n], key)
                )
            own[abl][name]["num_examples_auc"] = ev.auc_examples if headline else 0
    bar.close()
    return at, own


def _sanity_config(config):
    """The run's config with at most `eval.sanity_pio_images` PIO masks (cost: steps per image)."""
    p = config.generator.pio
    if p.num_images <= config.eval.sanity_pio_images:
        return config
    config = copy.deepcopy(config)
    config.generator.pio.num_images = max(config.eval.sanity_pio_images, p.per_step)
    return config


def sanity(ev: Evaluation, config, scores: Scores) -> dict:
    """Phase 4: model randomisation tests (Adebayo et al. 2018) in pathway space.

    ``gencnp_retrained_iou``: mean IoU of GEN-CNP pathways of the trained classifier and of a
    generator retrained (``eval.sanity_steps``) on the weight-randomised classifier (BatchNorm
    statistics re-estimated), at the generators' own gates and, ranking by scores, at each
    density; ``neuron_mct_iou_at_density``: the same for NeuronMCT; ``gencnp_features_iou``:
    the trained generator on the randomised classifier's features (out of distribution).
    """
    run, seed = ev.run, ev.run.seed
    train = inputs.load_data(config, "train")
    rand = train_classifier.randomized_classifier(
        config, run.classifier, train, run.mesh, seed + 13
    )
    rand_generator = train_generator.fit_generator(
        _sanity_config(config), rand, train, run.mesh, config.eval.sanity_steps, seed + 17
    )
    rand_fills = ev.fills[ev.ablations[0]]
    if ev.ablations[0] == "mean":
        control = train.images[: config.eval.control_examples]
        rand_fills = explain.channel_means(rand, control, run.normalize, run.batch_size)
    fns = eval_methods.make_score_fns(ev.settings)
    models = (rand_generator, rand.with_fills(rand_fills))
    gen, _ = passes.score_pass(run, fns["gencnp"], models, ev.subset.images)
    mct, _ = passes.score_pass(run, fns["neuron_mct"], models, ev.subset.images)
    iou = lambda a, b: float(np.mean(metrics.paired_iou_B(jnp.asarray(a), jnp.asarray(b))))
    trained = scores.per_method
    at = lambda name, other: {
        str(d): iou(
            passes.top_k(trained[name], d, run.key("sanity", d)),
            passes.top_k(other, d, run.key("sanity", d)),
        )
        for d in ev.densities
    }
    random_classifier = run.classifier.with_state(
        perturbation.randomize_weights(run.classifier.state, seed + 13)
    )
    feature_fn = jax.jit(eval_methods.make_sanity_fn(ev.settings))
    placed = sharding.replicate(run.mesh, (run.generator, random_classifier))
    own_gates = scores.own_gates["gencnp"]
    swap = batched.map_batches(
        lambda b: feature_fn(*placed, b["images"], b["gates"]),
        lambda idx: {"images": run.images(ev.subset.images, idx), "gates": own_gates[idx]},
        len(ev.subset.images),
        run.batch_size,
        run.mesh,
    )
    return {
        "gencnp_retrained_iou": iou(own_gates, gen["gates"]),
        "gencnp_retrained_iou_at_density": at("gencnp", gen["scores"]),
        "neuron_mct_iou_at_density": at("neuron_mct", mct["scores"]),
        "gencnp_features_iou": float(np.mean(swap)),
        "gencnp_features_iou_note": "trained generator on randomised features: out of distribution",
    }


def _pick_controls(at: dict, own: dict, by: str) -> dict:
    """Adds ``constant`` and ``class_constant``: per density (and at own density) the source
    with the lower mDC under ablation `by` (`controls.better_source`), the same source under
    every ablation. Returns ``kind -> density (or "own") -> source``."""
    sources = {}
    for kind in ("constant", "class_constant"):
        for d in at[by]:
            mdc = {src: at[by][d][f"{kind}_{src}"]["mDC"] for src in CONTROL_SOURCES}
            sources.setdefault(kind, {})[d] = controls.better_source(mdc)
    for per_density in at.values():
        for d, row in per_density.items():
            for kind in ("constant", "class_constant"):
                src = sources[kind][d]
                row[kind] = {**row[f"{kind}_{src}"], f"{kind}_source": src}
    own_sources = {}
    for kind in ("constant", "class_constant"):
        mdc = {src: own[by][f"{kind}_{src}"]["mDC"] for src in CONTROL_SOURCES}
        own_sources[kind] = src = controls.better_source(mdc)
        for rows in own.values():
            rows[kind] = {**rows[f"{kind}_{src}"], f"{kind}_source": src}
    return {**sources, "own": own_sources}


def _gains(row: dict) -> dict:
    """``method -> mDC(class_constant) / mDC(method)`` at one density."""
    return {
        nm: controls.specificity_gain(row["class_constant"]["mDC"], m["mDC"])
        for nm, m in row.items()
    }


def _per_density(at: dict, fn) -> dict:
    return {abl: {d: fn(row) for d, row in per.items()} for abl, per in at.items()}


def assemble(ev: Evaluation, config, scores: Scores, phases: dict) -> dict:
    """Phase 5: the results dict (`none_for_nan`, ready for JSON) from the phases' outputs
    (``at``, ``own``, ``sanity``, ``null_conf``, ``control_examples``)."""
    at, own = phases["at"], phases["own"]
    by = "mean" if "mean" in ev.ablations else ev.ablations[0]
    sources = _pick_controls(at, own, by)
    for name, sec in scores.seconds_per_image.items():
        for rows in own.values():
            rows[name]["seconds_per_image"] = sec
    head, others = ev.ablations[0], ev.ablations[1:]
    site_density = {  # per-site densities move out of the metric rows
        nm: {k.split("/", 1)[1]: m.pop(k) for k in list(m) if k.startswith("density/")}
        for rows in own.values()
        for nm, m in rows.items()
    }
    n = len(ev.subset.images)
    methods = {name: {**own[head][name], "num_examples": n} for name in own[head]}
    for other in others:
        methods.update({f"{nm}_{other}_ablation": own[other][nm] for nm in own[other]})
    e = config.eval
    return passes.none_for_nan(
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
            "constant_source": sources,
            "null_confidence_full_model": phases["null_conf"],
            "sanity": phases["sanity"],
            "sanity_iou": phases["sanity"]["gencnp_retrained_iou"],
            "config": {
                "densities": list(ev.densities),
                "ablations": list(ev.ablations),
                "num_examples": n,
                "control_examples": phases["control_examples"],
                "auc_examples": ev.auc_examples,
                "sanity_steps": e.sanity_steps,
                "sanity_pio_images": e.sanity_pio_images,
                "seed": config.seed,
                "batch_size": e.batch_size,
                "generator_ablation": config.generator.ablation,
                "daq_temperature": config.generator.daq.temperature,
                "daq_sigma": config.generator.daq.sigma,
                **{f"cdrp_{k}": getattr(ev.settings.cdrp, k) for k in _CDRP_FIELDS},
                "intgrad_steps": ev.settings.intgrad_steps,
                "auc_points": ev.settings.auc_points,
            },
        }
    )


_CDRP_FIELDS = ("steps", "gamma", "lr", "momentum", "threshold")


def evaluate(config, workdir: str) -> dict:
    """Evaluates every method and control; writes ``WORKDIR/eval/results.{json,md}``.

    Returns:
      The results dict written to results.json (NaN written as null); keys documented in
      docs and in `evaluate_passes.results_table`.
    """
    t0, e = time.time(), config.eval
    test = inputs.load_data(config, "test")
    n = min(len(test.labels), e.num_examples or len(test.labels))
    classifier = loading.load_classifier(config, workdir)
    generator, _, means = loading.load_generator(config, workdir, classifier)
    bank = build_bank.load_bank(config, workdir, classifier)
    normalize = lambda x: inputs.normalize(config, x)
    mesh = inputs.make_mesh(config)
    run = passes.Run(mesh, e.batch_size, generator, classifier, normalize, config.seed)
    zeros = {k: np.zeros((c,), np.float32) for k, c in classifier.site_channels.items()}
    fills = {"zero": zeros, "mean": {k: np.asarray(v, np.float32) for k, v in means.items()}}
    ablations, densities = tuple(e.ablations), tuple(float(d) for d in e.densities)
    settings = settings_from_config(config)
    score_fns = eval_methods.make_score_fns(settings)
    k = classifier.num_classes
    offset = np.random.default_rng(config.seed).integers(0, max(k - 1, 1), n)
    auc_n = min(n, e.auc_examples) if e.auc_examples else n
    headline = classifier.with_fills(fills[ablations[0]])
    scores, full_logits = score(run, headline, test.images[:n], score_fns)
    classes = full_logits.argmax(-1).astype(np.int32)
    wrong = ((classes + 1 + offset) % k).astype(np.int32)
    subset = Subset(test.images[:n], classes, wrong, full_logits)
    ev = Evaluation(run, subset, fills, ablations, densities, settings, auc_n)
    train = inputs.load_data(config, "train")
    tables = class_tables(ev, score_fns, bank, train.images[: e.control_examples])
    names = ("gencnp", "gencnp_transfer", *eval_methods.SCORED[1:], "random", *CLASS_TABLES[1:])
    at, own = fixed_densities(ev, scores, tables, names)
    # p_c of the full classifier on the all-zero (normalised-mean) image, c each test prediction
    zero_image = jnp.zeros_like(normalize(test.images[:1]))
    null_logits_1xK = classifier.logits(zero_image)
    null_conf = float(np.mean(np.asarray(jax.nn.softmax(null_logits_1xK[0]))[classes]))
    phases = {
        "at": at,
        "own": own,
        "sanity": sanity(ev, config, scores),
        "null_conf": null_conf,
        "control_examples": min(len(train.labels), e.control_examples),
    }
    results = assemble(ev, config, scores, phases)
    results["seconds"] = round(time.time() - t0, 2)
    out_dir = workdir_lib.eval_dir(workdir)
    writers.write_text(os.path.join(out_dir, "results.md"), passes.results_table(results))
    writers.write_json(os.path.join(out_dir, "results.json"), results)
    return results
