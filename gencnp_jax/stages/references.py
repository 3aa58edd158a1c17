"""The references every method is read against at each fixed density (docs/METHOD.md §6).

* The **class reference** is the best one-mask-per-class we can find. Its candidates, each a
  score row per class whose top-d is the class's mask: a class search (`eval.oracle.search`)
  started from the class means of per-instance optimised (PIO) masks of training images and
  fitted on those training images; those PIO class means themselves; and the class tables of
  the evaluation (the controls' mean scores, the class pathways' ranking). For each class the
  candidate with the lowest mDC on that class's validation images is kept: built from
  training images, chosen on validation images, never fitted to the test images.
* The **instance reference** is the best per-image mask we can find, on the first
  ``eval.reference_examples`` images of the common test subset. Its candidates: the image's
  PIO ranking, an instance search started from it, the class reference's mask of the image's
  class, and the top-d of every per-instance baseline's scores (CDRP, the gradient methods:
  never GEN-CNP's own). Each image keeps the candidate with its lowest drop in confidence, so
  on every image it is at most the class reference and at most every baseline.

Both are yardsticks, not bounds: better masks may exist. The searches depend on the classifier
alone, not on the generator: they are cached in ``WORKDIR/eval/references/`` and reused while
their settings hold.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs
from gencnp_jax.eval import baselines, controls, metrics, oracle
from gencnp_jax.io import batched, checkpointing, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.train import pio_targets

LEARNING_RATE = 0.05  # Adam on scores standardised per row: one step moves a rank a little
SEARCH = "search"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the references are searched.

    Attributes:
      examples: test images of the instance reference (the first of the common subset), and
        PIO target (training) images the class search fits.
      steps: Adam steps of every search (0: the candidates are the starts).
    """

    examples: int
    steps: int

    @classmethod
    def from_config(cls, config) -> Settings:
        return cls(
            examples=int(config.eval.reference_examples), steps=int(config.eval.reference_steps)
        )

    def oracle(self) -> oracle.OracleSettings:
        return oracle.OracleSettings(
            steps=jnp.int32(self.steps),
            learning_rate=jnp.float32(LEARNING_RATE),
            rel_temperature=jnp.float32(daq.TOP_FRACTION_WIDTH),
        )


@jax.jit
def _search(classifier, images, full_logits, theta_RxN, assign_BxR, density, settings):
    sites = classifier.site_channels
    logits_fn = lambda masks_BxN: classifier.logits(images, gates_lib.unflatten(masks_BxN, sites))
    return oracle.search(logits_fn, full_logits, theta_RxN, assign_BxR, density, settings)


@jax.jit
def _drops(classifier, images, full_logits, masks_BxN):
    """Each image's relative drop in confidence under its mask (a fraction)."""
    logits = classifier.logits(images, gates_lib.unflatten(masks_BxN, classifier.site_channels))
    return metrics.relative_drop(full_logits, logits, jnp.argmax(full_logits, -1))


def drops(run, classifier, images_uint8, full_logits, masks_BxN) -> np.ndarray:
    """``f32[B]``: `_drops` over every image (padded batches over the mesh)."""
    placed = sharding.replicate(run.mesh, classifier)
    return batched.map_batches(
        lambda b: _drops(placed, b["images"], b["full"], b["masks"]),
        lambda idx: {
            "images": run.images(images_uint8, idx),
            "full": np.asarray(full_logits)[idx],
            "masks": np.asarray(masks_BxN)[idx],
        },
        len(images_uint8),
        run.batch_size,
        run.mesh,
    )


def _search_all(run, classifier, images_uint8, full_logits, start_RxN, classes_B, ds, opt):
    """``density -> best theta`` of one search per density over every image at once, sharded
    over the mesh: rows per class (`classes_B` given: theta replicated, each image reads its
    class's row) or per image (`classes_B` None: theta sharded with its images)."""
    n = len(images_uint8)
    per_image = classes_B is None
    assign_BxR = np.eye(n if per_image else len(start_RxN), dtype=np.float32)
    assign_BxR = assign_BxR if per_image else assign_BxR[classes_B]
    images, full = sharding.shard_batch(run.mesh, run.normalize(images_uint8), full_logits)
    placed = sharding.replicate(run.mesh, classifier)
    if per_image:  # row i is image i: both sharded alike (assign's rows with the images)
        assign, start = sharding.shard_batch(run.mesh, assign_BxR, start_RxN)
    else:
        assign = sharding.shard_batch(run.mesh, assign_BxR)
        start = sharding.replicate(run.mesh, start_RxN)
    out = {}
    for d in ds:
        theta, _ = _search(placed, images, full, start, assign, jnp.float32(d), opt)
        out[str(d)] = np.asarray(theta)
    return out


def _cache(folder: str, settings: dict) -> dict | None:
    """The cached arrays of `folder` if its settings are `settings`; else the folder emptied."""
    path = os.path.join(folder, "settings.json")
    saved = writers.read_json(path)
    arrays = os.path.join(folder, "arrays.npz")
    if saved == json.loads(json.dumps(settings)) and os.path.exists(arrays):
        with np.load(arrays) as z:
            return {k: z[k] for k in z.files}
    if jax.process_index() == 0 and os.path.isdir(folder):
        shutil.rmtree(folder)
    return None


def _store(folder: str, settings: dict, arrays: dict) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(folder, exist_ok=True)
    with writers.atomic_file(os.path.join(folder, "arrays.npz"), "wb") as f:
        np.savez(f, **arrays)
    writers.write_json(os.path.join(folder, "settings.json"), settings)


@dataclasses.dataclass(frozen=True)
class Searches:
    """What the references search for, per density (cached: the classifier's alone).

    Attributes:
      pio_class_means_KxN: class means of the training PIO masks' standardised logits.
      class_search: ``density -> f32[K, N]``, the class search from them.
      pio_BxN: the reference test images' PIO logits.
      instance_search: ``density -> f32[B, N]``, the instance search from them.
    """

    pio_class_means_KxN: np.ndarray
    class_search: dict[str, np.ndarray]
    pio_BxN: np.ndarray
    instance_search: dict[str, np.ndarray]


def searches(config, workdir, run, classifier: FrozenClassifier, subset, densities) -> Searches:
    """The PIO masks and the searches of both references, from the cache when it holds.

    `classifier` carries the headline ablation's fills; `subset` is the common test subset
    (its first `Settings.examples` images are the instance reference's).
    """
    s = Settings.from_config(config)
    k = classifier.num_classes
    folder = os.path.join(workdir_lib.eval_dir(workdir), "references")
    key = {
        "settings": dataclasses.asdict(s),
        "densities": [float(d) for d in densities],
        "pio": pio_targets._settings(config, inputs.load_data(config, "train")),
        "fingerprint": _fingerprint(classifier),
        "test_examples": int(len(subset.classes)),
        "fills": None if classifier.fills is None else "mean",
    }
    cached = _cache(folder, key)
    if cached is not None:
        return _unpack(cached, densities)
    opt = s.oracle()
    # the class search: on training images, from their PIO masks' class means
    train = inputs.load_data(config, "train")
    pio_dir = os.path.join(workdir_lib.generator_dir(workdir), "pio_targets")
    with timings.phase("train_pio"):
        targets = pio_targets.compute(config, classifier, train, run.mesh, pio_dir, trim=False)
    rows = targets.indices[: s.examples]
    train_images = train.images[rows]
    train_logits = _full_logits(run, classifier, train_images)
    train_classes = train_logits.argmax(-1)
    standard = np.asarray(oracle.standardise_rows(targets.logits_flat[: s.examples]))
    _, means_KxN = controls.class_mean_scores(standard, train_classes, k)
    with timings.phase("class_search"):
        class_search = _search_all(
            run, classifier, train_images, train_logits, means_KxN, train_classes, densities, opt
        )
    # the instance search: on the reference test images, from their own PIO masks
    n = min(s.examples, len(subset.classes))
    test_images = subset.images[:n]
    with timings.phase("test_pio"):
        pio_BxN = pio_targets.optimise(config, classifier, test_images, run.mesh)["logits_flat"]
    pio_BxN = np.asarray(oracle.standardise_rows(pio_BxN))
    with timings.phase("instance_search"):
        instance_search = _search_all(
            run, classifier, test_images, subset.full_logits[:n], pio_BxN, None, densities, opt
        )
    arrays = {"pio_class_means_KxN": means_KxN, "pio_BxN": pio_BxN}
    arrays.update({f"class_search/{d}": v for d, v in class_search.items()})
    arrays.update({f"instance_search/{d}": v for d, v in instance_search.items()})
    _store(folder, key, arrays)
    return _unpack(arrays, densities)


def _unpack(arrays: dict, densities) -> Searches:
    return Searches(
        pio_class_means_KxN=arrays["pio_class_means_KxN"],
        class_search={str(d): arrays[f"class_search/{d}"] for d in densities},
        pio_BxN=arrays["pio_BxN"],
        instance_search={str(d): arrays[f"instance_search/{d}"] for d in densities},
    )


def _fingerprint(classifier: FrozenClassifier) -> str:
    return checkpointing.tree_checksum(classifier.state, by_path=True)[:16]


@jax.jit
def _logits(classifier, images):
    return classifier.logits(images)


def _full_logits(run, classifier, images_uint8) -> np.ndarray:
    placed = sharding.replicate(run.mesh, classifier)
    return batched.map_batches(
        lambda x: _logits(placed, x),
        lambda idx: run.images(images_uint8, idx),
        len(images_uint8),
        run.batch_size,
        run.mesh,
    )


@dataclasses.dataclass(frozen=True)
class ClassReference:
    """The best one-mask-per-class found, per density.

    Attributes:
      masks_KxN: ``density -> f32[K, N]`` 0/1, one mask per class.
      sources: ``density -> [candidate name per class]``: which candidate each class kept.
    """

    masks_KxN: dict[str, np.ndarray]
    sources: dict[str, list[str]]


def class_reference(run, classifier, found: Searches, tables: dict, validation, densities):
    """The class reference: per density and class, the candidate class mask with the lowest
    mDC on the class's `validation` images (a `Subset` of the validation split).

    `tables` are the evaluation's ``name -> f32[K, N]`` class score tables (the controls'
    mean scores, the class pathways' ranking), candidates beside the PIO class means and the
    class search.
    """
    k = classifier.num_classes
    masks, sources = {}, {}
    onehot_VxK = np.eye(k, dtype=np.float32)[validation.classes]
    counts_K = onehot_VxK.sum(0)
    for d in densities:
        candidates = {
            SEARCH: found.class_search[str(d)],
            "pio_class_means": found.pio_class_means_KxN,
            **tables,
        }
        best_K, best_masks_KxN, best_names = None, None, None
        for name, table_KxN in candidates.items():
            key = run.key("reference", name, d)
            masks_KxN = np.asarray(controls.class_masks(table_KxN, d, key))
            drop_V = drops(
                run, classifier, validation.images, validation.full_logits,
                masks_KxN[validation.classes],
            )  # fmt: skip
            drop_K = np.where(counts_K > 0, onehot_VxK.T @ drop_V / np.maximum(counts_K, 1), 0)
            if best_K is None:
                best_K, best_masks_KxN, best_names = drop_K, masks_KxN.copy(), [name] * k
                continue
            better_K = drop_K < best_K
            best_K = np.where(better_K, drop_K, best_K)
            best_masks_KxN[better_K] = masks_KxN[better_K]
            best_names = [name if b else old for b, old in zip(better_K, best_names, strict=True)]
        masks[str(d)], sources[str(d)] = best_masks_KxN, best_names
    return ClassReference(masks, sources)


@dataclasses.dataclass(frozen=True)
class InstanceReference:
    """The best per-image mask found, per density, on the first images of the subset.

    Attributes:
      masks_BxN: ``density -> f32[B, N]`` 0/1.
      drop_B: ``density -> f32[B]``, each image's relative drop under its mask (a fraction).
      class_drop_B: ``density -> f32[B]``, the same under the class reference's mask.
      sources: ``density -> {candidate: images that kept it}``.
    """

    masks_BxN: dict[str, np.ndarray]
    drop_B: dict[str, np.ndarray]
    class_drop_B: dict[str, np.ndarray]
    sources: dict[str, dict[str, int]]


def instance_reference(
    run, classifier, found: Searches, subset, reference: ClassReference, baseline_scores: dict
):
    """The instance reference: per density and image, the candidate mask (its PIO ranking,
    the instance search from it, its class's class-reference mask, the top-d of each of
    `baseline_scores`, ``name -> f32[B_subset, N]``) with the lowest drop."""
    n = len(found.pio_BxN)
    images, full, classes = subset.images[:n], subset.full_logits[:n], subset.classes[:n]
    masks, drop, class_drop, sources = {}, {}, {}, {}
    for d, class_masks_KxN in reference.masks_KxN.items():
        rows_B = jnp.arange(n)
        candidates = {
            "pio_ranking": _top(found.pio_BxN, float(d), run.key("reference", "pio", d), rows_B),
            SEARCH: _top(
                found.instance_search[d], float(d), run.key("reference", "search", d), rows_B
            ),
            "class_reference": class_masks_KxN[classes],
        }
        for name, scores_BxN in baseline_scores.items():
            key = run.key("reference", name, d)
            candidates[name] = _top(np.asarray(scores_BxN)[:n], float(d), key, rows_B)
        per = {name: drops(run, classifier, images, full, m) for name, m in candidates.items()}
        names = list(candidates)
        stacked_CxB = np.stack([per[name] for name in names])
        choice_B = np.argmin(stacked_CxB, 0)
        masks[d] = np.stack([candidates[names[c]][i] for i, c in enumerate(choice_B)])
        drop[d] = stacked_CxB[choice_B, np.arange(n)]
        class_drop[d] = per["class_reference"]
        sources[d] = {name: int(np.sum(choice_B == c)) for c, name in enumerate(names)}
    return InstanceReference(masks, drop, class_drop, sources)


def _top(scores_BxN, density, key, rows_B) -> np.ndarray:
    return np.asarray(baselines.top_k_at_density(jnp.asarray(scores_BxN), density, key, rows_B))
