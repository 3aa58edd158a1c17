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

from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, sharding
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.method import pio
from gencnp_jax.models import classifiers
from gencnp_jax.stages import context, train_loop

CHUNK = 256  # images per cached file


@dataclasses.dataclass(frozen=True)
class Targets:
    """PIO masks of training images.

    Attributes:
      indices: int64[M] rows of the training split.
      masks_flat: f32[M, N] 0/1 masks (sites in `gates.flatten` order).
      summary: density, agreement, mDC, leakage of the masks (`summary`), seconds, settings.
    """

    indices: np.ndarray
    masks_flat: np.ndarray
    summary: dict


def enabled(config) -> bool:
    """Whether the generator distils PIO masks (a weight and some images)."""
    g = config.generator
    return g.loss.w_distill > 0 and g.pio.num_images > 0


def hparams(config) -> pio.PioHParams:
    """The optimiser's numbers: the `config.generator.pio` fields of that name."""
    p = config.generator.pio
    return pio.PioHParams.create(**{f.name: p[f.name] for f in dataclasses.fields(pio.PioHParams)})


def _settings(config, split) -> dict:
    """What the masks depend on, besides the classifier: a changed value recomputes them."""
    p = config.generator.pio
    return {
        **{k: p[k] for k in p.keys() if k != "per_step"},
        "ablation": config.generator.ablation,
        "seed": config.seed,
        "train_examples": int(len(split.labels)),
    }


def compute(config, classifier, split, fills, mesh, cache_dir: str | None = None) -> Targets:
    """PIO masks of ``config.generator.pio.num_images`` images of `split` (see module doc)."""
    p = config.generator.pio
    m = min(int(p.num_images), len(split.labels))
    indices = np.sort(np.random.default_rng(config.seed + 101).choice(len(split.labels), m, False))
    settings = _settings(config, split)
    _prepare_cache(cache_dir, settings)
    fn = jax.jit(
        lambda cls_state, fills, hp, x: pio.optimise_masks(
            lambda images, g=None: classifiers.forward(
                classifier.graphdef, cls_state, images, g, fills
            ),
            x,
            hp,
        )
    )
    cls_state, fills_r, hp = sharding.replicate(mesh, (classifier.state, fills, hparams(config)))
    batch = min(int(p.batch_size), CHUNK)
    bar = logging_utils.progress(m, 0, "pio_targets")
    t0, chunks = time.time(), []
    for start in range(0, m, CHUNK):
        rows = indices[start : start + CHUNK]
        path = None if cache_dir is None else os.path.join(cache_dir, f"chunk_{start:07d}.npz")
        if path is not None and os.path.exists(path):
            with np.load(path) as z:
                chunks.append({k: z[k] for k in z.files})
        else:
            chunks.append(
                batched.map_batches(
                    lambda x: fn(cls_state, fills_r, hp, x),
                    lambda idx, rows=rows: context.normalize(config, split.images[rows[idx]]),
                    len(rows),
                    batch,
                    mesh,
                )
            )
            if path is not None and jax.process_index() == 0:
                with logging_utils.atomic_file(path, "wb") as f:
                    np.savez(f, **chunks[-1])
        bar.update(len(rows))
    bar.close()
    outs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    report = {**summary(outs), "seconds": time.time() - t0, "settings": settings}
    return Targets(indices, outs["masks_flat"].astype(np.float32), report)


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
    old = logging_utils.read_json(path)
    if old is not None and old != json.loads(json.dumps(settings)):
        print(f"pio_targets: settings changed ({old} -> {settings}): recomputing the masks")
        shutil.rmtree(cache_dir)
    elif old is None and glob.glob(os.path.join(cache_dir, "chunk_*.npz")):
        shutil.rmtree(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    logging_utils.write_json(path, settings)


def step_batches(config, targets: Targets, split, mesh, seed: int):
    """``step -> {target_images, target_masks}``: `pio.per_step` targets per train step."""
    arrays_at = lambda j: {
        "target_images": context.normalize(config, split.images[targets.indices[j]]),
        "target_masks": targets.masks_flat[j],
    }
    per_step = int(config.generator.pio.per_step)
    return train_loop.batches_at(mesh, arrays_at, len(targets.indices), per_step, seed)
