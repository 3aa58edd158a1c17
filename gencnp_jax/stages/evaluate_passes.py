"""The passes `evaluate` makes over images: score passes, metric passes, AUCs, control tables.

Every loop over examples goes through `io.batched.map_batches` (pad, shard, run, gather, trim).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.eval import accumulator, baselines, controls
from gencnp_jax.io import batched, sharding, writers
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator


@dataclasses.dataclass(frozen=True)
class Run:
    """What every pass shares: the mesh, the models, how to feed images, the seeded keys.

    Attributes:
      mesh: the data mesh.
      batch_size: images per pass (a multiple of the mesh size).
      generator: the trained generator.
      classifier: the classifier it explains, without fills (each pass sets its ablation's).
      normalize: uint8 pixels -> the classifier's float input.
      seed: the run's seed (`key`).
    """

    mesh: jax.sharding.Mesh
    batch_size: int
    generator: FrozenGenerator
    classifier: FrozenClassifier
    normalize: Callable[[np.ndarray], np.ndarray]
    seed: int

    def images(self, images_uint8: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return self.normalize(images_uint8[idx])

    def key(self, *names) -> jax.Array:
        """A seeded key per name path (e.g. ``("topk", "cdrp", "0.1")``)."""
        key = jax.random.key(self.seed + 11)
        for name in names:
            key = jax.random.fold_in(key, zlib.crc32(str(name).encode()) & 0x7FFFFFFF)
        return key


def score_pass(
    run: Run, fn, models: tuple, images_uint8: np.ndarray, desc: str = ""
) -> tuple[dict, float]:
    """``(outputs, seconds_per_image)`` of ``fn(*models, images)`` over every image (compiled
    first, so the time excludes compiling); a progress bar named `desc` when given."""
    n = len(images_uint8)
    placed = sharding.replicate(run.mesh, models)
    jitted = jax.jit(fn)
    first = run.images(images_uint8, np.zeros(run.batch_size, np.int64))
    jax.block_until_ready(jitted(*placed, sharding.shard_batch(run.mesh, first)))
    bar = writers.progress(n, desc=desc, disable=not desc)
    start = time.perf_counter()
    out = batched.map_batches(
        lambda images: jitted(*placed, images),
        lambda idx: run.images(images_uint8, idx),
        n,
        run.batch_size,
        run.mesh,
        progress=bar.update,
    )
    seconds = (time.perf_counter() - start) / max(n, 1)
    bar.close()
    return out, seconds


@dataclasses.dataclass(frozen=True)
class Masks:
    """One mask per image, and optionally a wrong class's mask per image (class pathways).

    Attributes:
      gates_BxN: ``f32[B, N]`` host gates, 0/1.
      wrong: ``(gates_BxN, classes_B)``: a wrong class's mask and that class, per image
        (``class_leakage``, ``other_class_drop``); None for per-instance methods.
    """

    gates_BxN: np.ndarray
    wrong: tuple[np.ndarray, np.ndarray] | None = None


def metric_pass(
    run: Run,
    metric_fn,
    classifier: FrozenClassifier,
    subset,
    masks: Masks,
    full_logits=None,
) -> tuple[dict, dict]:
    """Metrics of one mask per image of `subset` (its ``images`` and ``classes``):
    ``(reduced, per_instance)``, the flat dict of `accumulator.reduce` (with ``acIOU`` and
    ``inter_class_iou`` of the masks, and ``top_pathway_class_share``: the largest share of the
    images the pathway model gives one class) and the per-instance values it reduced.
    `classifier`'s fills are the ablation. `full_logits` (host ``f32[B, K]``): the full
    model's logits, given to skip recomputing them."""
    placed = sharding.replicate(run.mesh, classifier)
    classes_B = subset.classes

    def make_batch(idx):
        batch = {
            "images": run.images(subset.images, idx),
            "classes": classes_B[idx].astype(np.int32),
            "gates": np.asarray(masks.gates_BxN)[idx],
        }
        if masks.wrong is not None:
            wrong_gates, wrong_classes = masks.wrong
            batch["wrong"] = (np.asarray(wrong_gates)[idx], wrong_classes[idx].astype(np.int32))
        if full_logits is not None:
            batch["full"] = full_logits[idx]
        return batch

    def fn(b):
        return metric_fn(
            placed, b["images"], b["classes"], b["gates"], b.get("wrong"), b.get("full")
        )

    per = batched.map_batches(fn, make_batch, len(classes_B), run.batch_size, run.mesh)
    pathway_class_B, _ = per.pop("pathway_class")
    gates_BxN = np.asarray(masks.gates_BxN)
    reduced = accumulator.reduce(per, gates_BxN, classes_B, run.classifier.num_classes)
    counts = np.bincount(pathway_class_B.astype(np.int64), minlength=run.classifier.num_classes)
    reduced["top_pathway_class_share"] = float(counts.max() / max(len(pathway_class_B), 1))
    return reduced, per


def auc_pass(run: Run, auc_fn, classifier: FrozenClassifier, subset, scores_BxN, key) -> dict:
    """Mean deletion / insertion AUCs of `scores_BxN` over the rows of `subset`."""
    placed = sharding.replicate(run.mesh, (classifier, key))
    classes_B = subset.classes
    out = batched.map_batches(
        lambda b: auc_fn(placed[0], b["images"], b["classes"], b["scores"], b["rows"], placed[1]),
        lambda idx: {
            "images": run.images(subset.images, idx),
            "classes": classes_B[idx].astype(np.int32),
            "scores": np.asarray(scores_BxN)[idx],
            "rows": idx.astype(np.int32),
        },
        len(classes_B),
        run.batch_size,
        run.mesh,
    )
    return {k: float(np.mean(v)) for k, v in out.items()}


def top_k(scores_BxN, density, key) -> np.ndarray:
    """Host `baselines.top_k_at_density` with per-row keys (row = example index)."""
    rows_B = jnp.arange(np.shape(scores_BxN)[0])
    return np.asarray(baselines.top_k_at_density(jnp.asarray(scores_BxN), density, key, rows_B))


def control_tables(run: Run, score_fns, classifier, train_images, num_classes) -> dict:
    """``source -> (mean_N, mean_KxN)``: training-set mean GEN-CNP and NeuronMCT scores, over
    all images and per predicted class (`controls.class_mean_scores`), `classifier`'s fills
    the ablation the scores assume."""
    models = (run.generator, classifier)
    gen, _ = score_pass(run, score_fns["gencnp"], models, train_images, "evaluate: controls")
    mct, _ = score_pass(run, score_fns["neuron_mct"], models, train_images, "evaluate: controls")
    classes_B = gen["full_logits"].argmax(-1)
    return {
        "gencnp_score": controls.class_mean_scores(gen["scores"], classes_B, num_classes),
        "mct_score": controls.class_mean_scores(mct["scores"], classes_B, num_classes),
    }


def none_for_nan(tree):
    """`tree` with NaN / inf floats as None (JSON null) and numpy scalars as Python ones."""
    if isinstance(tree, dict):
        return {k: none_for_nan(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [none_for_nan(v) for v in tree]
    if isinstance(tree, np.floating | np.integer):
        tree = tree.item()
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def results_table(results: dict) -> str:
    """Markdown: one table per density (headline ablation) with the references beside every
    method, then the own-density table; degenerate rows marked, the choices' split named."""
    head = results["config"]["ablations"][0]
    cols = ("mDC", "mIC", "agreement", "leakage", "class_leakage", "density_mean", "acIOU")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    flags = results.get("flags", {})
    on_ref = results.get("on_reference_images", {})
    n_ref = results.get("references", {}).get("num_examples_instance")
    lines = [
        f"# Evaluation ({results['num_examples']} test images, {head} ablation)",
        "",
        f"Choices (the controls' sources, the class reference's candidates) are made on "
        f"{results['validation']['num_examples']} validation images; every number below is on "
        f"the test split. References are yardsticks, not bounds. `mDC (ref. images)` is each "
        f"row on the {n_ref} images of the instance reference.",
        "",
    ]
    for d, rows in results["at_density"][head].items():
        header = (*cols, "mDC (ref. images)")
        lines += [f"## density {d}", "", "| method | " + " | ".join(header) + " |"]
        lines.append("|---" * (len(header) + 1) + "|")
        for name, m in rows.items():
            ref = on_ref.get(d, {}).get(name, {}).get("mDC")
            cells = [fmt(m.get(c)) for c in cols] + [fmt(ref)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## own density", "", "| method | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, m in results["own_density"][head].items():
        mark = " ⚠ degenerate" if name in flags else ""
        lines.append(f"| {name}{mark} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |")
    lines.append("")
    for name, reasons in flags.items():
        lines.append(f"- ⚠ {name}: {'; '.join(reasons)}")
    lines.append(f"\nsanity: {results['sanity']}")
    return "\n".join(lines) + "\n"
