"""The passes `evaluate` makes over images: score passes, metric passes, controls, sanity.

Every loop over examples goes through `io.batched.map_batches` (pad, shard, run, gather, trim).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import accumulator, baselines, controls, metrics, perturbation
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.io import batched, sharding, writers
from gencnp_jax.method import explain
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator as train_generator


@dataclasses.dataclass
class Run:
    """What every pass shares: the mesh, the images and how to feed them."""

    config: object
    mesh: jax.sharding.Mesh
    batch_size: int
    classifier: loading.Classifier
    seed: int

    def images(self, images_uint8: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return inputs.normalize(self.config, images_uint8[idx])

    def key(self, *names) -> jax.Array:
        """A seeded key per name path (e.g. ``("topk", "cdrp", "0.1")``)."""
        key = jax.random.key(self.seed + 11)
        for name in names:
            key = jax.random.fold_in(key, zlib.crc32(str(name).encode()) & 0x7FFFFFFF)
        return key


def score_pass(
    run: Run, fn, params, images_uint8: np.ndarray, desc: str = ""
) -> tuple[dict, float]:
    """``(outputs, seconds_per_image)`` of a score fn over every image (compiled first, so the
    time excludes compiling); a progress bar named `desc` when given."""
    n = len(images_uint8)
    placed = sharding.replicate(run.mesh, params)
    jitted = jax.jit(fn)
    first = {"images": run.images(images_uint8, np.zeros(run.batch_size, np.int64))}
    jax.block_until_ready(jitted(placed, sharding.shard_batch(run.mesh, first["images"])))
    bar = writers.progress(n, desc=desc, disable=not desc)
    start = time.perf_counter()
    out = batched.map_batches(
        lambda b: jitted(placed, b["images"]),
        lambda idx: {"images": run.images(images_uint8, idx)},
        n,
        run.batch_size,
        run.mesh,
        progress=bar.update,
    )
    seconds = (time.perf_counter() - start) / max(n, 1)
    bar.close()
    return out, seconds


def metric_pass(
    run: Run, metric_fn, fills, images_uint8, classes_B, gates_BxN, wrong=None, full_logits=None
) -> dict:
    """Per-instance metrics of one mask per image (``gates_BxN``, host), reduced to a flat dict
    (`accumulator.reduce`, with ``acIOU`` and ``inter_class_iou`` of the masks). `full_logits`
    (host ``f32[B, K]``): the full model's logits, given to skip recomputing them."""
    cls_state = sharding.replicate(run.mesh, run.classifier.state)
    placed_fills = sharding.replicate(run.mesh, fills)

    def make_batch(idx):
        batch = {
            "images": run.images(images_uint8, idx),
            "classes": classes_B[idx].astype(np.int32),
            "gates": np.asarray(gates_BxN)[idx],
        }
        if wrong is not None:
            batch["wrong"] = (np.asarray(wrong[0])[idx], wrong[1][idx].astype(np.int32))
        if full_logits is not None:
            batch["full"] = full_logits[idx]
        return batch

    def fn(b):
        return metric_fn(
            cls_state,
            placed_fills,
            b["images"],
            b["classes"],
            b["gates"],
            b.get("wrong"),
            b.get("full"),
        )

    per = batched.map_batches(fn, make_batch, len(classes_B), run.batch_size, run.mesh)
    return accumulator.reduce(per, np.asarray(gates_BxN), classes_B, run.classifier.num_classes)


def auc_pass(run: Run, auc_fn, fills, images_uint8, classes_B, scores_BxN, key) -> dict:
    """Mean deletion / insertion AUCs of `scores_BxN` over its rows."""
    cls_state = sharding.replicate(run.mesh, run.classifier.state)
    placed = sharding.replicate(run.mesh, {"fills": fills, "key": key})
    out = batched.map_batches(
        lambda b: auc_fn(
            cls_state,
            placed["fills"],
            b["images"],
            b["classes"],
            b["scores"],
            b["rows"],
            placed["key"],
        ),
        lambda idx: {
            "images": run.images(images_uint8, idx),
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


def control_tables(run: Run, score_fns, params, train_images, num_classes) -> dict:
    """``source -> (mean_N, mean_KxN)``: training-set mean GEN-CNP and NeuronMCT scores, over
    all images and per predicted class (`controls.class_mean_scores`)."""
    gen, _ = score_pass(run, score_fns["gencnp"], params, train_images, "evaluate: controls")
    mct, _ = score_pass(run, score_fns["neuron_mct"], params, train_images, "evaluate: controls")
    classes_B = gen["full_logits"].argmax(-1)
    return {
        "gencnp_score": controls.class_mean_scores(gen["scores"], classes_B, num_classes),
        "mct_score": controls.class_mean_scores(mct["scores"], classes_B, num_classes),
    }


def _sanity_config(config):
    """The run's config with at most `eval.sanity_pio_images` PIO masks (cost: steps per image)."""
    p = config.generator.pio
    if p.num_images <= config.eval.sanity_pio_images:
        return config
    config = copy.deepcopy(config)
    config.generator.pio.num_images = max(config.eval.sanity_pio_images, p.per_step)
    return config


def sanity(run: Run, s, gen_graphdef, gen_state, fills, test_images, scored, densities) -> dict:
    """Model randomisation tests (Adebayo et al. 2018) in pathway space.

    ``gencnp_retrained_iou``: mean IoU of GEN-CNP pathways of the trained classifier and of a
    generator retrained (``eval.sanity_steps``) on the weight-randomised classifier (BatchNorm
    statistics re-estimated), at the generators' own gates and, ranking by scores, at each
    density; ``neuron_mct_iou_at_density``: the same for NeuronMCT; ``gencnp_features_iou``:
    the trained generator on the randomised classifier's features (out of distribution).
    """
    config, cls = run.config, run.classifier
    train = inputs.load_data(config, "train")
    rand = train_classifier.randomized_classifier(config, cls, train, run.mesh, run.seed + 13)
    rand_gd, rand_state = train_generator.fit_generator(
        _sanity_config(config), rand, train, run.mesh, config.eval.sanity_steps, run.seed + 17
    )
    rand_fills = fills
    if config.eval.ablations[0] == "mean":
        control = train.images[: config.eval.control_examples]
        normalize = lambda x: inputs.normalize(config, x)
        rand_fills = explain.channel_means(
            rand.graphdef, rand.state, control, normalize, run.batch_size
        )
    params = {"cls": rand.state, "gen": rand_state, "fills": rand_fills}
    fns = eval_methods.make_score_fns(rand.graphdef, rand_gd, s)
    gen, _ = score_pass(run, fns["gencnp"], params, test_images)
    mct, _ = score_pass(run, fns["neuron_mct"], params, test_images)
    iou = lambda a, b: float(np.mean(metrics.paired_iou_B(jnp.asarray(a), jnp.asarray(b))))
    at = lambda name, other: {
        str(d): iou(
            top_k(scored[name], d, run.key("sanity", d)), top_k(other, d, run.key("sanity", d))
        )
        for d in densities
    }
    random_state = perturbation.randomize_weights(cls.state, run.seed + 13)
    feature_fn = eval_methods.make_sanity_fn(cls.graphdef, gen_graphdef, s)
    placed = sharding.replicate(run.mesh, {"gen": gen_state, "cls": random_state})
    swap = batched.map_batches(
        lambda b: feature_fn(placed["gen"], placed["cls"], b["images"], b["gates"]),
        lambda idx: {"images": run.images(test_images, idx), "gates": scored["gencnp_gates"][idx]},
        len(test_images),
        run.batch_size,
        run.mesh,
    )
    return {
        "gencnp_retrained_iou": iou(scored["gencnp_gates"], gen["gates"]),
        "gencnp_retrained_iou_at_density": at("gencnp", gen["scores"]),
        "neuron_mct_iou_at_density": at("neuron_mct", mct["scores"]),
        "gencnp_features_iou": float(np.mean(swap)),
        "gencnp_features_iou_note": "trained generator on randomised features: out of distribution",
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
    """Markdown: one table per density (headline ablation), then the own-density table."""
    head = results["config"]["ablations"][0]
    cols = ("mDC", "mIC", "agreement", "leakage", "class_leakage", "density_mean", "acIOU")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [f"# Evaluation ({results['num_examples']} test images, {head} ablation)", ""]
    blocks = [(f"density {d}", rows) for d, rows in results["at_density"][head].items()]
    blocks.append(("own density", results["own_density"][head]))
    for title, rows in blocks:
        lines += [f"## {title}", "", "| method | " + " | ".join(cols) + " |"]
        lines.append("|---" * (len(cols) + 1) + "|")
        for name, m in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    lines.append(f"sanity: {results['sanity']}")
    return "\n".join(lines) + "\n"
