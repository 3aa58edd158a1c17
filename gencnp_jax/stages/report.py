"""The report stage: figures of a trained run and the static page that gathers them.

Reads the classifier, generator, bank and eval results of a workdir; writes PNGs under
``WORKDIR/report/`` and last ``report/index.html``, the stage's completion marker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs
from gencnp_jax.io import batched, data, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import explain
from gencnp_jax.stages import build_bank, validation
from gencnp_jax.viz import curves, plots
from gencnp_jax.viz import html as report

log = logging.getLogger(__name__)

PATHWAY_SAMPLES = 3  # test images whose per-site pathway is drawn
GALLERY_PER_CLASS = 2  # test images per class in the gallery (correct and wrong mixed)
GALLERY_WIDTH_IN, GALLERY_ROW_IN = 7.0, 1.55  # gallery figure size, inches
# What the generator's own test metrics show when there is no eval/results.json yet.
_GENERATOR_METRICS = ("mIC", "mDC", "agreement", "density_mean", "density_std", "leakage")


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Readable class names (see ``data.class_names``): ``"0".."K-1"`` where there are none."""
    return data.class_names(dataset, num_classes)


def gradcam_site(config, site_channels: Mapping[str, int]) -> str:
    """``config.eval.gradcam_site``, or the deepest gate site when it is ``""``."""
    site = config.eval.gradcam_site or list(site_channels)[-1]
    if site not in site_channels:
        raise validation.ConfigError(
            f"config.eval.gradcam_site={site!r} is not a gate site of this classifier: "
            f"choose one of {list(site_channels)} (or '' for the last)"
        )
    return site


def explain_split(explainer: explainer_lib.Explainer, images_uint8: np.ndarray, batch_size: int):
    """Pathways of a whole split as host numpy: ``(gates site -> u8[N, C], pred i32[N],
    pathway_pred i32[N])``; fixed-size padded batches over the mesh, so one compilation."""
    mesh = explainer.mesh
    # Never more rows than the split (rounded up to the mesh): tiny splits compile small.
    batch_size = min(batch_size, -(-len(images_uint8) // mesh.size) * mesh.size)
    sharding.check_batch_size(mesh, batch_size)

    def fn(images):
        p = explain.jit_explain(
            explainer.generator, explainer.classifier, images, explainer.settings
        )
        gates = {s: (v >= 0.5).astype(jnp.uint8) for s, v in p.gates.items()}
        return gates, p.explained_class, jnp.argmax(p.pathway_logits, -1)

    with writers.progress(len(images_uint8), desc="report: pathways") as bar:
        gates, pred, pathway_pred = batched.map_batches(
            fn,
            lambda idx: explainer.normalize(images_uint8[idx]),
            len(images_uint8),
            batch_size,
            mesh,
            progress=bar.update,
        )
    gates = {s: gates[s] for s in explainer.classifier.site_channels}  # jit sorts sites by name
    return gates, pred.astype(np.int32), pathway_pred.astype(np.int32)


def select_gallery(labels: np.ndarray, pred: np.ndarray, num_classes: int, per_class: int):
    """Test indices per class (by label), alternating correct and wrong predictions.

    Returns:
      ``class -> list of indices`` (fewer than `per_class` when the class has fewer images).
    """
    chosen = {}
    for k in range(num_classes):
        of_class = np.flatnonzero(labels == k)
        right, wrong = of_class[pred[of_class] == k], of_class[pred[of_class] != k]
        mixed = [i for pair in zip(right, wrong, strict=False) for i in pair]
        n = min(len(right), len(wrong))
        rest = list(right[n:]) + list(wrong[n:])
        chosen[k] = [int(i) for i in (mixed + rest)[:per_class]]
    return chosen


def _gallery(explainer, site, test, pred, pathway_pred, density, names, out_dir, per_class):
    """One PNG per class (its rows: input, Grad-CAM full / pathway, pathway gradient)."""
    chosen = select_gallery(test.labels, pred, len(names), per_class)
    order = [i for k in range(len(names)) for i in chosen[k]]
    if not order:
        return []
    fn = explainer.saliency_fn(site)
    images = explainer.normalize(test.images[np.asarray(order)])
    cam_full, cam_pathway, grad = jax.device_get(fn(images))
    at = {i: j for j, i in enumerate(order)}
    items = []
    for k, name in enumerate(names):
        if not chosen[k]:
            continue
        rows = []
        item = {"accuracy on the class": float(np.mean(pred[test.labels == k] == k))}
        for i in chosen[k]:
            mark = "✓" if pred[i] == k else "✗"
            title = f"#{i}: {name}\n→ {names[pred[i]]} {mark}"
            rows.append((images[at[i]], cam_full[at[i]], cam_pathway[at[i]], grad[at[i]], title))
            item[f"#{i}"] = f"→ {names[pred[i]]} {mark}, pathway → {names[pathway_pred[i]]}"
            item[f"#{i} density"] = float(density[i])
        fig, _ = plots.plot_gallery(rows)
        # The page shows gallery images at most ~560 px wide: a narrower figure keeps its
        # 9 pt labels readable there (constrained layout redoes the panels at save time).
        fig.set_size_inches(GALLERY_WIDTH_IN, 0.5 + GALLERY_ROW_IN * len(rows))
        path = plots.save(fig, os.path.join(out_dir, f"gallery_class{k}.png"))
        caption = f"{name}: test image → predicted class (Grad-CAM at {site})"
        items.append({"image": path, "caption": caption, **item})
    return items


def _bank_freq(config, workdir: str, classifier) -> dict | None:
    """The bank's class frequencies ``site -> f32[K, C]``, or None when there is no bank."""
    if not workdir_lib.is_done("build_bank", workdir):
        return None
    b = build_bank.load_bank(config, workdir, classifier)
    freq = b.get("freq") if isinstance(b, Mapping) else getattr(b, "freq", None)
    if freq is None:
        return None
    return {s: np.asarray(freq[s]) for s in classifier.site_channels if s in freq}


def _results(workdir: str) -> dict:
    """``eval/results.json`` with GEN-CNP's methods first; without it, the generator's own
    test metrics as the one row (marked by a ``source`` entry)."""
    results = writers.read_json(workdir_lib.done_file("evaluate", workdir))
    if results is not None:
        methods = results.get("methods", {})
        ours = sorted(methods, key=lambda name: not name.startswith("gencnp"))  # stable: ours first
        return {**results, "methods": {name: methods[name] for name in ours}}
    gen = writers.read_json(os.path.join(workdir, "generator", "metrics.json")) or {}
    row = {k: gen[k] for k in _GENERATOR_METRICS if k in gen}
    return {
        "source": "generator/metrics.json (no eval/results.json: run --mode=evaluate "
        "for the baselines)",
        "num_examples": gen.get("num_examples"),
        "methods": {"gencnp": row} if row else {},
    }


def make_report(
    config, workdir: str, samples: int = PATHWAY_SAMPLES, per_class: int = GALLERY_PER_CLASS
) -> str:
    """Draws every figure of a trained run and writes ``WORKDIR/report/index.html``.

    Needs the trained classifier and generator; the class-pathway figure needs the bank
    (``--mode=build_bank``) and the baselines chart ``eval/results.json``
    (``--mode=evaluate``): each is left out when its input is absent.

    Args:
      config: the run's config.
      workdir: the run's folder.
      samples: test images whose per-site pathway is drawn.
      per_class: test images per class in the gallery.

    Returns:
      The path of ``index.html``.
    """
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    out_dir = workdir_lib.report_dir(workdir)
    index = os.path.join(out_dir, "index.html")
    writer = jax.process_index() == 0
    if writer and os.path.exists(index):
        os.remove(index)  # the completion marker: absent until this run has written it all
    explainer = explainer_lib.Explainer.from_workdir(workdir, config)
    classifier = explainer.classifier
    site = gradcam_site(config, classifier.site_channels)
    names = class_names(config.data.dataset, classifier.num_classes)
    test = inputs.load_data(config, "test")
    with timings.phase("explain_split"):
        gates, pred, pathway_pred = explain_split(explainer, test.images, config.eval.batch_size)
    density = np.mean(np.concatenate(list(gates.values()), axis=1), axis=1)
    freq = _bank_freq(config, workdir, classifier)
    results = _results(workdir)
    if not writer:
        return index

    figures = {}

    def add(caption: str, name: str, fig_and_ax):
        figures[caption] = plots.save(fig_and_ax[0], os.path.join(out_dir, name))

    for i in range(min(samples, len(pred))):
        mark = "correct" if pred[i] == test.labels[i] else "wrong"
        title = f"test #{i}: {names[test.labels[i]]}, predicted {names[pred[i]]} ({mark})"
        add(
            f"Pathway of test image #{i} ({names[test.labels[i]]}, predicted "
            f"{names[pred[i]]}): the channels it keeps at each site",
            f"pathway_{i}.png",
            plots.plot_site_masks({s: g[i] for s, g in gates.items()}, title),
        )
    if freq:
        add(
            "Class-pathway frequency: the fraction of each class's bank samples that keep a "
            "channel",
            "class_frequency.png",
            plots.plot_class_frequency(freq, names),
        )
    per_class_density = {
        names[k]: density[pred == k] for k in range(len(names)) if np.any(pred == k)
    }
    add(
        f"Instance-specific sparsity: pathway density over the {len(pred)} test images, and "
        "per predicted class",
        "density_hist.png",
        plots.plot_density_hist(density, per_class_density),
    )
    methods = results.get("methods", {})
    if "source" not in results and any(
        "mDC" in m and "density_mean" in m for m in methods.values()
    ):
        add(
            "GEN-CNP against the baselines: density against mDC",
            "density_vs_mdc.png",
            plots.plot_density_vs_mdc(methods),
        )
    with timings.phase("gallery"):
        gallery = _gallery(
            explainer, site, test, pred, pathway_pred, density, names, out_dir, per_class
        )
    path = report.write_report(
        workdir,
        results,
        figures,
        config.to_json_best_effort(indent=2),
        gallery,
        curves.save_density_figures(results, out_dir),
    )
    log.info("report written to %s in %.1f s", path, time.time() - t0)
    return path
