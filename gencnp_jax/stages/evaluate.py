"""Evaluates GEN-CNP, its class pathways, the baselines, the controls and the references
(docs/METHOD.md §6-7). Writes ``WORKDIR/eval/results.{json,md}`` (``--mode=evaluate``).

Every method runs on one common subset of the test split (its first ``eval.num_examples``), at
fixed densities ``eval.densities`` (the top ``round(d N)`` of all N channels by the method's
scores, ties broken at random) and at its own density, under each of ``eval.ablations`` (the
first is the headline), each ablation scoring every method under its own fills. Every choice
the evaluation makes (which source a control takes, which candidate a class reference keeps)
is made on the validation split; the test split only reports.

Named phases, each a function, pass frozen records on:
`score` (each method's scores) -> `class_tables` (one score row per class: the controls, each
method's own class means, the class pathways) -> `validation_block` (GEN-CNP and the
controls on validation images, the choices) -> `references` (the best per-class and per-image
masks found) -> `fixed_densities` (every mask through the metric pass) -> `sanity` ->
`assemble` (with flags on degenerate rows).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import baselines, controls, metrics, perturbation
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.io import batched, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method.class_bank import ClassBank
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.stages import build_bank, references
from gencnp_jax.stages import evaluate_passes as passes
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import fills as fills_lib
from gencnp_jax.train import generator as train_generator

AT_DENSITY_KEYS = ("mDC", "mIC", "agreement", "leakage", "class_leakage", "density_mean")
AT_DENSITY_KEYS += ("acIOU", "inter_class_iou", "top_pathway_class_share")
CONTROL_SOURCES = ("gencnp", "neuron_mct")  # whose training-set mean scores the controls take
CONTROLS = ("constant", "class_constant")
# the methods whose scores depend on the ablation's fills (scored again under each ablation)
FILL_DEPENDENT = ("cdrp", "neuron_mct", "neuron_mct_signed", "neuron_intgrad")
REFERENCES = ("class_reference", "instance_reference")
# what to change when a method's own density degenerates (`flags`)
DENSITY_FIELDS = {
    "gencnp": "config.generator.loss.w_sparsity",
    "cdrp": "config.eval.cdrp_steps or config.eval.cdrp_gamma",
}


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
    """Images every method is scored on (the common test subset, or validation images).

    Attributes:
      images: ``u8[n, H, W, C]``.
      classes: ``i32[n]``, the full model's predictions (the explained classes).
      wrong_classes: ``i32[n]``, one wrong class per image (the class pathways' transfer).
      full_logits: ``f32[n, K]`` of the full model.
      split: the split they come from.
    """

    images: np.ndarray
    classes: np.ndarray
    wrong_classes: np.ndarray
    full_logits: np.ndarray
    split: str

    def first(self, n: int) -> Subset:
        return dataclasses.replace(
            self,
            images=self.images[:n],
            classes=self.classes[:n],
            wrong_classes=self.wrong_classes[:n],
            full_logits=self.full_logits[:n],
        )


@dataclasses.dataclass(frozen=True)
class Scores:
    """Phase 1: every per-instance method's scores on the subset, under one ablation.

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
      tables: ``name -> f32[K, N]``: ``gencnp_transfer`` (the class pathways' ranking),
        ``constant_<source>`` (one row, every class alike: a source's training-set mean
        scores) and ``class_means_<method>`` (each method's training-set class-mean scores;
        the ``class_constant`` control is one of the sources').
      bank: the class-pathway bank (its own masks are ``gencnp_transfer``'s own density).
    """

    tables: dict[str, np.ndarray]
    bank: ClassBank | None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the phases share: the run, the subsets, the ablations' fills and the settings."""

    run: passes.Run
    subset: Subset
    validation: Subset | None
    fills: dict[str, dict | None]  # ablation -> fills (zeros or the training-set means)
    ablations: tuple[str, ...]
    densities: tuple[float, ...]
    settings: eval_methods.Settings
    auc_examples: int

    def classifier(self, ablation: str):
        return self.run.classifier.with_fills(self.fills[ablation])

    @property
    def headline(self) -> str:
        return self.ablations[0]


def score(run: passes.Run, classifier, images, score_fns, names=None) -> tuple[Scores, np.ndarray]:
    """Phase 1: the methods' scores on `images`, `classifier`'s fills the ablation they assume,
    and the full model's logits (from GEN-CNP's pass). `names` limits the methods."""
    per_method, own_gates, seconds = {}, {}, {}
    full_logits = None
    for name, fn in score_fns.items():
        if names is not None and name not in names:
            continue
        models = (run.generator, classifier)
        with timings.phase(f"score/{name}"):
            out, seconds[name] = passes.score_pass(
                run, fn, models, images, f"evaluate: {name} scores"
            )
        per_method[name] = out["scores"]
        if "gates" in out:
            own_gates[name] = out["gates"]
        if "full_logits" in out:
            full_logits = out["full_logits"]
    return Scores(per_method, own_gates, seconds), full_logits


def score_every_ablation(ev_run, classifiers: dict, images, score_fns) -> tuple[dict, np.ndarray]:
    """``({ablation: Scores}, full_logits)``: every method under the headline ablation, the
    fill-dependent ones again under each other ablation (the rest are the same scores)."""
    ablations = list(classifiers)
    head, full_logits = score(ev_run, classifiers[ablations[0]], images, score_fns)
    n, n_all = len(images), ev_run.classifier.num_neurons
    key = ev_run.key("random_scores")
    head.per_method["random"] = np.asarray(jax.random.uniform(key, (n, n_all)))
    head.per_method["random_wrong"] = np.asarray(
        jax.random.uniform(jax.random.fold_in(key, 1), (n, n_all))
    )
    out = {ablations[0]: head}
    for abl in ablations[1:]:
        other, _ = score(ev_run, classifiers[abl], images, score_fns, FILL_DEPENDENT)
        per = {**head.per_method, **other.per_method}
        own = {**head.own_gates, **other.own_gates}
        secs = {**head.seconds_per_image, **other.seconds_per_image}
        out[abl] = Scores(per, own, secs)
    return out, full_logits


def class_tables(ev: Evaluation, score_fns, bank: ClassBank | None, train_images) -> dict:
    """Phase 2: ``{ablation: ClassTables}``: the class pathways' ranking (none without a
    `bank`), and the training-set mean scores, over all images and per predicted class
    (`controls.class_mean_scores`): every method's under the headline ablation, the controls'
    sources' under the others (their only readers: each method's own class means are read
    under the headline ablation alone)."""
    k = ev.run.classifier.num_classes
    out, head = {}, None
    for abl in ev.ablations:
        names = None if head is None else tuple(n for n in FILL_DEPENDENT if n in CONTROL_SOURCES)
        scores, full = score(ev.run, ev.classifier(abl), train_images, score_fns, names)
        if head is None:
            head, classes_B = scores, full.argmax(-1)
        per_method = {**head.per_method, **scores.per_method}
        if abl != ev.headline:
            per_method = {name: per_method[name] for name in CONTROL_SOURCES}
        tables = {} if bank is None else {"gencnp_transfer": bank.ranking()}
        for name, scores_BxN in per_method.items():
            mean_N, mean_KxN = controls.class_mean_scores(scores_BxN, classes_B, k)
            tables[f"class_means_{name}"] = mean_KxN
            if name in CONTROL_SOURCES:
                tables[f"constant_{name}"] = np.tile(mean_N, (k, 1))
        out[abl] = ClassTables(tables, bank)
    return out


def _class_masks(ev: Evaluation, name: str, table_KxN, density) -> np.ndarray:
    """Class masks ``f32[K, N]`` at `density`; the constant's rows are one mask (row 0's)."""
    key = ev.run.key("mask", name, density)
    if name.startswith("constant_"):
        row = np.asarray(controls.constant_mask(table_KxN[0], density, key))
        return np.tile(row, (len(table_KxN), 1))
    return np.asarray(controls.class_masks(table_KxN, density, key))


def class_masks_of(subset: Subset, masks_KxN) -> passes.Masks:
    """A class-indexed mask table as one mask per image (and the wrong class's)."""
    wrong_B = subset.wrong_classes
    return passes.Masks(masks_KxN[subset.classes], (masks_KxN[wrong_B], wrong_B))


def masks_of(ev: Evaluation, scores: Scores, tables: ClassTables, name: str, density):
    """The `passes.Masks` of method or table `name` at `density` (a float, or "own")."""
    own = density == "own"
    if name in tables.tables:
        if own and name == "gencnp_transfer":
            masks_KxN = np.asarray(gates_lib.flatten(tables.bank.masks))
        else:
            at = float(scores.own_gates["gencnp"].mean()) if own else density
            masks_KxN = _class_masks(ev, name, tables.tables[name], at)
        return class_masks_of(ev.subset, masks_KxN)
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
        return passes.Masks(gates, (wrong, ev.subset.wrong_classes))
    if own:
        if name in scores.own_gates:
            return passes.Masks(scores.own_gates[name])
        matched = passes.top_k(scores_BxN, scores.gencnp_density_B, ev.run.key(name, "own"))
        return passes.Masks(matched)
    return passes.Masks(passes.top_k(scores_BxN, density, ev.run.key(name, density)))


def validation_block(ev: Evaluation, score_fns, tables: ClassTables) -> dict:
    """Phase 3: GEN-CNP, the controls' sources and the class tables on the validation images
    (headline ablation): what the evaluation's choices and the project's defaults are read
    from. ``{"split", "num_examples", "own_density": {"gencnp": ...}, "at_density": {d: {name:
    metrics}}, "control_source": {kind: {d: source}}}``."""
    val, classifier = ev.validation, ev.classifier(ev.headline)
    scores, _ = score(ev.run, classifier, val.images, score_fns, ("gencnp",))
    local = dataclasses.replace(ev, subset=val)
    metric_fns = {extra: eval_methods.make_metric_fn(extra) for extra in (False, True)}
    own, _ = passes.metric_pass(
        ev.run, metric_fns[True], classifier, val, passes.Masks(scores.own_gates["gencnp"])
    )
    at, sources = {}, {}
    names = ("gencnp", *(_control_name(kind, src) for kind in CONTROLS for src in CONTROL_SOURCES))
    for d in ev.densities:
        row = {}
        for name in names:
            masks = masks_of(local, scores, tables, name, d)
            m, _ = passes.metric_pass(
                ev.run, metric_fns[False], classifier, val, masks, val.full_logits
            )
            row[name] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
        at[str(d)] = row
        for kind in CONTROLS:
            mdc = {src: row[_control_name(kind, src)]["mDC"] for src in CONTROL_SOURCES}
            sources.setdefault(kind, {})[str(d)] = controls.better_source(mdc)
    return {
        "split": "validation",
        "num_examples": int(len(val.classes)),
        "own_density": {"gencnp": own},
        "at_density": at,
        "control_source": sources,
    }


def _control_name(kind: str, source: str) -> str:
    """The table a control takes from `source`: ``constant_<source>``, ``class_means_<source>``."""
    return f"constant_{source}" if kind == "constant" else f"class_means_{source}"


@dataclasses.dataclass(frozen=True)
class References:
    """Phase 4: the class reference (every test image) and the instance reference (the first
    test images), under the headline ablation (`stages/references.py`)."""

    class_reference: references.ClassReference
    instance_reference: references.InstanceReference


def reference_phase(
    ev: Evaluation, config, workdir: str, tables: ClassTables, scores: Scores
) -> References:
    """Phase 4: both references at every fixed density; the class reference's candidates
    chosen on the validation images, the baselines' scores among the instance reference's."""
    classifier = ev.classifier(ev.headline)
    found = references.searches(config, workdir, ev.run, classifier, ev.subset, ev.densities)
    candidates = {
        name: table
        for name, table in tables.tables.items()
        if name.startswith("class_means_") or name == "gencnp_transfer"
    }
    class_ref = references.class_reference(
        ev.run, classifier, found, candidates, ev.validation, ev.densities
    )
    baseline_scores = {n: s for n, s in scores.per_method.items() if n not in ("gencnp", "random")}
    instance_ref = references.instance_reference(
        ev.run, classifier, found, ev.subset, class_ref, baseline_scores
    )
    return References(class_ref, instance_ref)


def _rank_scores(ev: Evaluation, scores: Scores, tables: ClassTables, name) -> np.ndarray | None:
    """The per-instance scores that rank `name`'s channels for the AUCs (None: controls)."""
    if name in scores.per_method:
        return scores.per_method[name]
    if name == "gencnp_transfer":
        return tables.tables[name][ev.subset.classes]
    return None


def _reduce_rows(per: dict, rows: slice) -> dict:
    """The mean of a few per-instance metrics over `rows` (e.g. the reference images)."""
    out = {}
    for name in ("mDC", "agreement"):
        v, w = (np.asarray(x, np.float64)[rows] for x in per[name])
        out[name] = float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return out


def fixed_densities(
    ev: Evaluation, scores: dict, tables: dict, refs: References, names, headline_names
) -> dict:
    """Phase 5: every method's metrics at each fixed density and at its own, under each
    ablation (AUCs under the headline ablation), and the references beside them (headline).
    `headline_names` (each method's own class-mean masks) are scored at the fixed densities
    of the headline ablation only.

    Returns:
      ``{"at": {abl: {d: {name: metrics}}}, "own": {abl: {name: metrics}},
      "on_reference_images": {d: {name: {mDC, agreement}}}}``: the last, every row's mean over
      the instance reference's images only (the like-for-like comparison with it).
    """
    metric_fns = {extra: eval_methods.make_metric_fn(extra) for extra in (False, True)}
    auc_fn = eval_methods.make_auc_fn(ev.settings.auc_points)
    n_ref = len(next(iter(refs.instance_reference.drop_B.values())))
    at, own, on_ref = {}, {}, {}
    steps = len(ev.ablations) * (len(ev.densities) + 1) * len(names)
    steps += len(ev.densities) * len(headline_names)
    bar = writers.progress(steps, desc="evaluate: metrics")
    for abl in ev.ablations:
        classifier, s, t = ev.classifier(abl), scores[abl], tables[abl]
        headline = abl == ev.headline
        at[abl] = {}
        for d in ev.densities:
            row = {}
            for name in (*names, *headline_names) if headline else names:
                bar.set_postfix_str(f"{abl} ablation, density {d}, {name}", refresh=False)
                bar.update(1)
                masks = masks_of(ev, s, t, name, d)
                m, per = passes.metric_pass(
                    ev.run, metric_fns[False], classifier, ev.subset, masks, ev.subset.full_logits
                )
                row[name] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
                if headline:
                    on_ref.setdefault(str(d), {})[name] = _reduce_rows(per, slice(0, n_ref))
            if headline:
                row.update(_reference_rows(ev, classifier, refs, d, metric_fns[False], on_ref))
            at[abl][str(d)] = row
        own[abl] = {}
        for name in names:
            bar.set_postfix_str(f"{abl} ablation, own density, {name}", refresh=False)
            bar.update(1)
            masks = masks_of(ev, s, t, name, "own")
            own[abl][name], _ = passes.metric_pass(
                ev.run, metric_fns[True], classifier, ev.subset, masks
            )
            rank = _rank_scores(ev, s, t, name)
            if headline and rank is not None and ev.auc_examples > 0:
                n = ev.auc_examples
                key = ev.run.key("auc", name)
                own[abl][name].update(
                    passes.auc_pass(ev.run, auc_fn, classifier, ev.subset.first(n), rank[:n], key)
                )
            own[abl][name]["num_examples_auc"] = ev.auc_examples if headline else 0
    bar.close()
    return {"at": at, "own": own, "on_reference_images": on_ref}


def _reference_rows(ev, classifier, refs: References, d, metric_fn, on_ref) -> dict:
    """The class reference (every image) and the instance reference (its images) at `d`."""
    rows = {}
    class_masks_KxN = refs.class_reference.masks_KxN[str(d)]
    m, per = passes.metric_pass(
        ev.run,
        metric_fn,
        classifier,
        ev.subset,
        class_masks_of(ev.subset, class_masks_KxN),
        ev.subset.full_logits,
    )
    rows["class_reference"] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
    inst = refs.instance_reference
    n_ref = len(inst.drop_B[str(d)])
    on_ref[str(d)]["class_reference"] = _reduce_rows(per, slice(0, n_ref))
    first = ev.subset.first(n_ref)
    m, _ = passes.metric_pass(
        ev.run, metric_fn, classifier, first, passes.Masks(inst.masks_BxN[str(d)]),
        first.full_logits,
    )  # fmt: skip
    rows["instance_reference"] = {k: m[k] for k in AT_DENSITY_KEYS if k in m}
    rows["instance_reference"]["num_examples"] = n_ref
    on_ref[str(d)]["instance_reference"] = {
        k: rows["instance_reference"][k] for k in ("mDC", "agreement")
    }
    return rows


def _sanity_config(config):
    """The run's config with at most `eval.sanity_pio_images` PIO masks (cost: steps per image)."""
    p = config.generator.pio
    if p.num_images <= config.eval.sanity_pio_images:
        return config
    config = copy.deepcopy(config)
    config.generator.pio.num_images = max(config.eval.sanity_pio_images, p.per_step)
    return config


def sanity(ev: Evaluation, config, scores: Scores) -> dict:
    """Phase 6: model randomisation tests (Adebayo et al. 2018) in pathway space.

    ``gencnp_retrained_iou``: mean IoU of GEN-CNP pathways of the trained classifier and of a
    generator retrained (``eval.sanity_steps``) on the weight-randomised classifier (BatchNorm
    statistics re-estimated), at the generators' own gates and, ranking by scores, at each
    density (ties broken by an independent key on each side); ``neuron_mct_iou_at_density``:
    the same for NeuronMCT; ``gencnp_features_iou``: the trained generator on the randomised
    classifier's features (out of distribution).
    """
    run, seed = ev.run, ev.run.seed
    train = inputs.load_data(config, "train")
    with timings.phase("randomise"):
        rand = train_classifier.randomized_classifier(
            config, run.classifier, train, run.mesh, seed + 13
        )
    with timings.phase("generator"):
        rand_generator = train_generator.fit_generator(
            _sanity_config(config), rand, train, run.mesh, config.eval.sanity_steps, seed + 17
        )
    rand_fills = ev.fills[ev.headline]
    if ev.headline == "mean":
        control = train.images[: config.eval.control_examples]
        rand_fills = fills_lib.channel_means(rand, control, run.normalize, run.batch_size, run.mesh)
    fns = eval_methods.make_score_fns(ev.settings)
    models = (rand_generator, rand.with_fills(rand_fills))
    gen, _ = passes.score_pass(run, fns["gencnp"], models, ev.subset.images)
    mct, _ = passes.score_pass(run, fns["neuron_mct"], models, ev.subset.images)
    iou = lambda a, b: float(np.mean(metrics.paired_iou_B(jnp.asarray(a), jnp.asarray(b))))
    trained = scores.per_method
    at = lambda name, other: {
        str(d): iou(
            passes.top_k(trained[name], d, run.key("sanity", "trained", d)),
            passes.top_k(other, d, run.key("sanity", "randomised", d)),
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


def _set_controls(at: dict, own: dict, sources: dict) -> None:
    """Adds ``constant`` and ``class_constant`` rows: at each density the source chosen on
    validation (`validation_block`), the same source under every ablation; at their own
    density (GEN-CNP's), the source of the densest fixed density below it."""
    for per_density in at.values():
        for d, row in per_density.items():
            for kind in CONTROLS:
                src = sources[kind][d]
                row[kind] = {**row[_control_name(kind, src)], f"{kind}_source": src}
    for rows in own.values():
        for kind in CONTROLS:
            src = sources[kind][max(sources[kind], key=float)]
            rows[kind] = {**rows[_control_name(kind, src)], f"{kind}_source": src}


def flags(own_head: dict, full_top_share: float) -> dict:
    """``method -> [reasons]`` for a degenerate own-density row: it keeps (nearly) every
    channel (density >= 0.99) or none (<= 0.01), or its pathway model gives (nearly) every
    input one class (the agreement of a constant class, where the full model does not)."""
    out = {}
    for name, m in own_head.items():
        reasons = []
        d = m.get("density_mean")
        if d is not None and d >= 0.99:
            reasons.append(f"own density {d:.2f}: it keeps every channel")
        elif d is not None and d <= 0.01:
            reasons.append(f"own density {d:.2f}: it keeps no channel")
        share = m.get("top_pathway_class_share")
        if share is not None and share >= 0.99 and full_top_share < 0.9:
            reasons.append(f"its pathways give {share:.0%} of the images one class")
        if reasons:
            out[name] = reasons
    return out


def _warn(flagged: dict) -> None:
    for name, reasons in flagged.items():
        field = DENSITY_FIELDS.get(name, "its settings")
        print(
            f"warning: {name}'s own-density row is degenerate ({'; '.join(reasons)}): "
            f"change {field}",
            file=sys.stderr,
            flush=True,
        )


def _gains(row: dict, reference: str) -> dict:
    """``method -> mDC(reference row) / mDC(method)`` at one density."""
    return {
        nm: controls.specificity_gain(row[reference]["mDC"], m["mDC"])
        for nm, m in row.items()
        if reference in row
    }


def _own_class_mean_gains(at_abl: dict, methods) -> dict:
    """``d -> method -> mDC(the method's own class-mean mask) / mDC(method)``."""
    return {
        d: {
            nm: controls.specificity_gain(row[f"class_means_{nm}"]["mDC"], row[nm]["mDC"])
            for nm in methods
            if f"class_means_{nm}" in row and nm in row
        }
        for d, row in at_abl.items()
    }


def ablation_overlap(ev: Evaluation, scores: dict) -> dict:
    """``method -> density -> mean IoU`` of each fill-dependent method's top-d masks scored
    under the first two ablations: below 1 where the ablations' own fills rank differently."""
    if len(ev.ablations) < 2:
        return {}
    a, b = (scores[abl].per_method for abl in ev.ablations[:2])
    out = {}
    for name in FILL_DEPENDENT:
        out[name] = {}
        for d in ev.densities:
            key = ev.run.key("overlap", name, d)
            masks_a, masks_b = passes.top_k(a[name], d, key), passes.top_k(b[name], d, key)
            iou_B = metrics.paired_iou_B(jnp.asarray(masks_a), jnp.asarray(masks_b))
            out[name][str(d)] = float(np.mean(iou_B))
    return out


def assemble(ev: Evaluation, config, phases: dict) -> dict:
    """Phase 7: the results dict (`none_for_nan`, ready for JSON) from the phases' outputs."""
    metrics_out, scores = phases["metrics"], phases["scores"]
    at, own = metrics_out["at"], metrics_out["own"]
    _set_controls(at, own, phases["validation"]["control_source"])
    for abl, rows in own.items():
        for name, sec in scores[abl].seconds_per_image.items():
            if name in rows:
                rows[name]["seconds_per_image"] = sec
    site_density = {  # per-site densities move out of the metric rows
        nm: {k.split("/", 1)[1]: m.pop(k) for k in list(m) if k.startswith("density/")}
        for rows in own.values()
        for nm, m in rows.items()
    }
    n = len(ev.subset.images)
    head = ev.headline
    methods = {name: {**own[head][name], "num_examples": n} for name in own[head]}
    for other in ev.ablations[1:]:
        methods.update({f"{nm}_{other}_ablation": own[other][nm] for nm in own[other]})
    full_share = float(np.bincount(ev.subset.classes).max() / max(n, 1))
    flagged = flags(own[head], full_share)
    _warn(flagged)
    refs: References = phases["references"]
    e = config.eval
    per_image = {
        d: {
            "instance_le_class_on_every_image": bool(
                np.all(refs.instance_reference.drop_B[d] <= refs.instance_reference.class_drop_B[d])
            ),
            "instance_sources": refs.instance_reference.sources[d],
            "class_sources": dict(
                zip(*np.unique(refs.class_reference.sources[d], return_counts=True), strict=True)
            ),
        }
        for d in refs.class_reference.masks_KxN
    }
    scored = list(eval_methods.SCORED)
    return passes.none_for_nan(
        {
            "split": "test",
            "num_examples": n,
            "methods": methods,
            "site_density": site_density,
            "at_density": at,
            "own_density": own,
            "on_reference_images": metrics_out["on_reference_images"],
            "references": {
                "num_examples_instance": int(
                    len(refs.instance_reference.drop_B[str(ev.densities[0])])
                ),
                "ablation": head,
                "per_density": per_image,
                "note": "yardsticks, not bounds: the best masks our searches found",
            },
            "specificity_gain": {
                "vs_class_reference": {
                    d: _gains(row, "class_reference") for d, row in at[head].items()
                },
                "vs_own_class_means": _own_class_mean_gains(at[head], scored),
                "vs_class_constant": {
                    abl: {d: _gains(row, "class_constant") for d, row in per.items()}
                    for abl, per in at.items()
                },
            },
            "random_reference": {
                abl: {
                    d: {x: row["random"].get(x) for x in ("leakage", "class_leakage")}
                    for d, row in per.items()
                }
                for abl, per in at.items()
            },
            "ablation_mask_iou": ablation_overlap(ev, scores),
            "validation": phases["validation"],
            "flags": flagged,
            "null_confidence_full_model": phases["null_conf"],
            "sanity": phases["sanity"],
            "sanity_iou": phases["sanity"]["gencnp_retrained_iou"],
            "config": {
                "densities": list(ev.densities),
                "ablations": list(ev.ablations),
                "num_examples": n,
                "validation_examples": phases["validation"]["num_examples"],
                "control_examples": phases["control_examples"],
                "auc_examples": ev.auc_examples,
                "reference_examples": e.reference_examples,
                "reference_steps": e.reference_steps,
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


def make_subset(run, classifier, images, split: str, seed: int) -> Subset:
    """A `Subset` of `images`: the full model's logits and classes, one wrong class each."""
    placed = sharding.replicate(run.mesh, classifier)
    logits = batched.map_batches(
        lambda x: _logits(placed, x),
        lambda idx: run.images(images, idx),
        len(images),
        run.batch_size,
        run.mesh,
    )
    classes = logits.argmax(-1).astype(np.int32)
    k = classifier.num_classes
    offset = np.random.default_rng(seed).integers(0, max(k - 1, 1), len(images))
    wrong = ((classes + 1 + offset) % k).astype(np.int32)
    return Subset(images, classes, wrong, logits, split)


@jax.jit
def _logits(classifier, images):
    return classifier.logits(images)


def open_run(config, workdir: str) -> tuple[passes.Run, dict]:
    """A trained run made ready to evaluate (here and in scripts/validation_read.py): its
    models loaded into the `Run` every pass goes through, and each ablation's fills
    (``{"zero" | "mean": {site: f32[C]}}``)."""
    classifier = loading.load_classifier(config, workdir)
    generator, _, means = loading.load_generator(config, workdir, classifier)
    normalize = lambda x: inputs.normalize(config, x)  # noqa: E731
    mesh = inputs.make_mesh(config)
    run = passes.Run(mesh, config.eval.batch_size, generator, classifier, normalize, config.seed)
    zeros = {k: np.zeros((c,), np.float32) for k, c in classifier.site_channels.items()}
    fills = {"zero": zeros, "mean": {k: np.asarray(v, np.float32) for k, v in means.items()}}
    return run, fills


def evaluate(config, workdir: str) -> dict:
    """Evaluates every method, control and reference; writes ``WORKDIR/eval/results.{json,md}``.

    Returns:
      The results dict written to results.json (NaN written as null); keys documented in
      docs/METHOD.md §6-7 and in `evaluate_passes.results_table`.
    """
    t0, e = time.time(), config.eval
    test = inputs.load_data(config, "test")
    validation = inputs.load_data(config, "validation")
    n = min(len(test.labels), e.num_examples or len(test.labels))
    n_val = min(len(validation.labels), e.num_examples or len(validation.labels))
    run, fills = open_run(config, workdir)
    classifier = run.classifier
    bank = build_bank.load_bank(config, workdir, classifier)
    ablations, densities = tuple(e.ablations), tuple(float(d) for d in e.densities)
    settings = settings_from_config(config)
    score_fns = eval_methods.make_score_fns(settings)
    auc_n = min(n, e.auc_examples) if e.auc_examples else n
    classifiers = {abl: classifier.with_fills(fills[abl]) for abl in ablations}
    head = classifiers[ablations[0]]
    subset = make_subset(run, head, test.images[:n], "test", config.seed)
    if n_val == 0:
        raise workdir_lib.StageOrderError(
            "the evaluation makes its choices on validation images and there are none: set "
            "config.data.validation_size > 0"
        )
    val_subset = make_subset(run, head, validation.images[:n_val], "validation", config.seed + 1)
    ev = Evaluation(run, subset, val_subset, fills, ablations, densities, settings, auc_n)
    with timings.phase("scores"):
        scores, _ = score_every_ablation(run, classifiers, subset.images, score_fns)
    train = inputs.load_data(config, "train")
    control_images = train.images[: e.control_examples]
    with timings.phase("class_tables"):
        tables = class_tables(ev, score_fns, bank, control_images)
    with timings.phase("validation"):
        val_block = validation_block(ev, score_fns, tables[ev.headline])
    with timings.phase("references"):
        refs = reference_phase(ev, config, workdir, tables[ev.headline], scores[ev.headline])
    names = ("gencnp", "gencnp_transfer", *eval_methods.SCORED[1:], "random")
    names += tuple(_control_name(kind, src) for kind in CONTROLS for src in CONTROL_SOURCES)
    others = (m for m in eval_methods.SCORED if m not in CONTROL_SOURCES)
    class_means = tuple(f"class_means_{m}" for m in others)
    with timings.phase("metrics"):
        metrics_out = fixed_densities(ev, scores, tables, refs, names, class_means)
    # p_c of the full classifier on the all-zero (normalised-mean) image, c each test prediction
    zero_image = jnp.zeros_like(run.normalize(test.images[:1]))
    null_logits_1xK = classifier.logits(zero_image)
    null_conf = float(np.mean(np.asarray(jax.nn.softmax(null_logits_1xK[0]))[subset.classes]))
    with timings.phase("sanity"):
        sanity_out = sanity(ev, config, scores[ev.headline])
    phases = {
        "metrics": metrics_out,
        "scores": scores,
        "validation": val_block,
        "references": refs,
        "sanity": sanity_out,
        "null_conf": null_conf,
        "control_examples": int(len(control_images)),
    }
    results = assemble(ev, config, phases)
    results["seconds"] = round(time.time() - t0, 2)
    out_dir = workdir_lib.eval_dir(workdir)
    writers.write_text(os.path.join(out_dir, "results.md"), passes.results_table(results))
    writers.write_json(os.path.join(out_dir, "results.json"), results)
    return results
