"""The generator's distillation targets: PIO masks (`method/pio.py`) of training images.

`config.generator.pio.num_images` training images (drawn with the run's seed) get a
per-instance optimised mask under the run's ablation; the generator then learns them through
the ``distill`` loss term. In a workdir the masks are cached chunk by chunk in
``generator/pio_targets/`` (a crash loses one chunk at most; a rerun reuses them); settings that
differ from the cached ones recompute them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, sharding, timings, writers
from gencnp_jax.method import pio
from gencnp_jax.train import loop as train_loop

CHUNK = 256  # images per cached file
# trimming is redone on every run (forward passes only): its settings keep the cache
_TRIM = ("trim_kl_budget",)


@dataclasses.dataclass(frozen=True)
class Targets:
    """PIO masks of training images.

    Attributes:
      indices: int64[M] rows of the training split.
      masks_flat: f32[M, N] 0/1 masks (sites in `gates.flatten` order).
      logits_flat: f32[M, N] the optimised gate logits.
      cuts: f32[M] each mask's logit cut, ``masks_flat = logits_flat > cuts`` (0 untrimmed).
      summary: density, agreement, mDC, leakage of the masks (`summary`), seconds, settings.
    """

    indices: np.ndarray
    masks_flat: np.ndarray
    logits_flat: np.ndarray
    cuts: np.ndarray
    summary: dict

    def distill_targets(self, temperature: float) -> np.ndarray:
        """What the generator learns: the 0/1 masks (``temperature == 0``), or soft targets
        ``sigmoid((logits - cut) / temperature)``, which keep the teacher's ranking of the kept
        (and closed) neurons; both put 0.5 at the same place, so the generator's masks agree."""
        if temperature <= 0:
            return self.masks_flat
        shifted_MxN = (self.logits_flat - self.cuts[:, None]) / temperature
        return np.asarray(jax.nn.sigmoid(shifted_MxN), np.float32)


def enabled(config) -> bool:
    """Whether the generator distils PIO masks (a weight and some images)."""
    return loading.distils_pio_targets(config)


def hparams(config) -> pio.PioHParams:
    """The optimiser's numbers: the `config.generator.pio` fields of that name."""
    p, names = config.generator.pio, [f.name for f in dataclasses.fields(pio.PioHParams)]
    # the leakage margin is the generator's own (one margin for one hinge)
    return pio.PioHParams.create(
        **{n: p[n] for n in names if n not in ("leak_margin", "init_logit")},
        leak_margin=config.generator.loss.leak_margin,
        init_logit=pio.INIT_LOGIT,
    )


def _settings(config, split) -> dict:
    """What the masks depend on, besides the classifier: a changed value recomputes them."""
    p = config.generator.pio
    return {
        **{k: p[k] for k in p.keys() if k not in ("per_step", "target_temperature", *_TRIM)},
        "format": 2,  # chunks hold logits_flat
        "ablation": config.generator.ablation,
        "init_logit": pio.INIT_LOGIT,
        "leak_margin": config.generator.loss.leak_margin,
        "seed": config.seed,
        "train_examples": int(len(split.labels)),
    }


def compute(
    config, classifier, split, mesh, cache_dir: str | None = None, trim: bool = True
) -> Targets:
    """PIO masks of ``config.generator.pio.num_images`` images of `split` (see module doc),
    under `classifier`'s fills (the run's ablation); `trim` False leaves them untrimmed."""
    p = config.generator.pio
    m = min(int(p.num_images), len(split.labels))
    indices = np.sort(np.random.default_rng(config.seed + 101).choice(len(split.labels), m, False))
    settings = _settings(config, split)
    _prepare_cache(cache_dir, settings)
    t0 = time.time()
    with timings.phase("optimise"):
        outs = optimise(config, classifier, split.images[indices], mesh, cache_dir)
    report = {"settings": settings}
    cuts = np.zeros(m, np.float32)
    if trim and p.trim_kl_budget > 0:
        report["untrimmed"] = summary(outs)
        with timings.phase("trim"):
            trimmed = _trim(config, classifier, split, mesh, indices, outs["logits_flat"])
        cuts = trimmed.pop("cuts")
        outs.update(trimmed)
        report["trim"] = {k: p[k] for k in _TRIM}
    report.update(summary(outs), seconds=time.time() - t0)  # cached chunks: load + trim
    as_f32 = lambda k: outs[k].astype(np.float32)
    return Targets(indices, as_f32("masks_flat"), as_f32("logits_flat"), cuts, report)


def optimise(config, classifier, images_uint8, mesh, cache_dir: str | None = None) -> dict:
    """`pio.optimise_masks` of `images_uint8` in chunks of `CHUNK` images, each cached as
    ``cache_dir/chunk_NNNNNNN.npz`` when `cache_dir` is given (read back on a rerun: the
    caller keys the folder by its settings, see `_prepare_cache`)."""
    p = config.generator.pio
    fn = jax.jit(pio.optimise_masks)
    placed, hp = sharding.replicate(mesh, (classifier, hparams(config)))
    m, batch = len(images_uint8), min(int(p.batch_size), CHUNK)
    bar = writers.progress(m, 0, "pio masks")
    chunks = []
    for start in range(0, m, CHUNK):
        images = images_uint8[start : start + CHUNK]
        path = None if cache_dir is None else os.path.join(cache_dir, f"chunk_{start:07d}.npz")
        if path is not None and os.path.exists(path):
            with np.load(path) as z:
                chunks.append({k: z[k] for k in z.files})
        else:
            chunks.append(
                batched.map_batches(
                    lambda x: fn(placed, x, hp),
                    lambda idx, images=images: inputs.normalize(config, images[idx]),
                    len(images),
                    batch,
                    mesh,
                )
            )
            if path is not None and jax.process_index() == 0:
                with writers.atomic_file(path, "wb") as f:
                    np.savez(f, **chunks[-1])
        bar.update(len(images))
    bar.close()
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _trim(config, classifier, split, mesh, indices, logits_flat) -> dict:
    """`pio.sparsest_cuts` of the masks on a density grid of step `pio.TRIM_STEP`."""
    p = config.generator.pio
    densities_G = np.arange(1, int(round(1.0 / pio.TRIM_STEP)) + 1) * pio.TRIM_STEP
    fn = jax.jit(
        lambda classifier, densities, budget, b: pio.sparsest_cuts(
            classifier, b["images"], b["logits"], densities, budget
        )
    )
    grid = (densities_G.astype(np.float32), np.float32(p.trim_kl_budget))
    args = sharding.replicate(mesh, (classifier, *grid))
    return batched.map_batches(
        lambda b: fn(*args, b),
        lambda idx: {
            "images": inputs.normalize(config, split.images[indices[idx]]),
            "logits": logits_flat[idx],
        },
        len(indices),
        min(int(p.batch_size), CHUNK),
        mesh,
    )


def summary(outputs: dict) -> dict:
    """Density, agreement, mDC and leakage of PIO masks (`pio.optimise_masks` outputs)."""
    o = {k: jnp.asarray(v) for k, v in outputs.items()}
    density_B = jnp.mean(o["masks_flat"], -1)
    leakage = metrics.leakage(
        o["partner_logits"], o["classes"], o["partner_classes"], o["has_partner"]
    )
    return {
        "num_images": int(density_B.shape[0]),
        "density_mean": float(jnp.mean(density_B)),
        "density_std": float(jnp.std(density_B)),
        "agreement": float(metrics.agreement(o["full_logits"], o["pathway_logits"])),
        "mDC": float(metrics.mDC(o["full_logits"], o["pathway_logits"])),
        "leakage": float(leakage),
    }


def _prepare_cache(cache_dir: str | None, settings: dict) -> None:
    """Creates the cache folder; drops chunks computed with other settings (says so)."""
    if cache_dir is None or jax.process_index() != 0:
        return
    path = os.path.join(cache_dir, "settings.json")
    old = writers.read_json(path)
    if old is not None and old != json.loads(json.dumps(settings)):
        print(f"pio_targets: settings changed ({old} -> {settings}): recomputing the masks")
        shutil.rmtree(cache_dir)
    elif old is None and glob.glob(os.path.join(cache_dir, "chunk_*.npz")):
        shutil.rmtree(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    writers.write_json(path, settings)


def step_batches(config, targets: Targets, readings: dict, mesh, seed: int):
    """``step -> {target_masks[, teacher_logits], target_pools, target_fo}``: `pio.per_step`
    targets per train step (`Targets.distill_targets` at `pio.target_temperature`; the
    optimised logits themselves for the ``rank`` term when its weight is > 0), with their
    images as the generator reads them (`readings`, a row per target)."""
    table_MxN = targets.distill_targets(float(config.generator.pio.target_temperature))
    rank = loading.has_rank_head(config)
    arrays_at = lambda j: {
        "target_masks": table_MxN[j],
        **({"teacher_logits": targets.logits_flat[j]} if rank else {}),
        **jax.tree.map(lambda a: a[j], readings),
    }
    per_step = int(config.generator.pio.per_step)
    return train_loop.batches_at(mesh, arrays_at, len(targets.indices), per_step, seed)
