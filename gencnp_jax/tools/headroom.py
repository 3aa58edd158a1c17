"""How much instance specificity the classifier leaves to find (``--mode=headroom``).

On the first ``headroom.num_examples`` images of the common evaluation subset, at each of
``eval.densities``, under the run's ablation, it scores (mDC, agreement, KL):

* ``gencnp``: the top-d of GEN-CNP's scores (as in `evaluate`);
* ``class_constant``: the top-d of GEN-CNP's mean score per predicted class over these images;
* ``instance_optimum_from_gencnp``: one score vector per image, optimised for it
  (`eval/oracle.py`), started from GEN-CNP's scores;
* ``class_optimum``: one per predicted class, shared by its images, optimised from two starts
  (GEN-CNP's class means, the class means of the instance optima), the better kept: the
  straight-through top-k finds local optima, and a weak class optimum would inflate the gain;
* ``instance_optimum``: one per image, started from the class optimum (so only what the image
  adds beyond its class moves it).

``headroom_gain = mDC(best class mask) / mDC(best instance mask)`` (null with ``steps = 0``,
where the optima are their starts), the best by mDC among ``CLASS_ROWS`` and ``INSTANCE_ROWS``
(named in ``best_class_mask``, ``best_instance_mask``): the optima minimise KL, which also
counts a confidence the mask adds, while mDC counts only what it takes away, so a KL
optimum need not have the lower mDC. It is the specificity gain an instance-specific
explainer could show; ``gencnp_gain = mDC(class_constant) / mDC(gencnp)`` is the one
`evaluate` reports (over training-image class means there). Writes
``WORKDIR/eval/headroom.json`` and ``headroom.md``.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax import explainer
from gencnp_jax.context import inputs
from gencnp_jax.eval import baselines, controls, metrics, oracle
from gencnp_jax.io import sharding, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import losses
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib

CLASS_ROWS = ("class_constant", "class_optimum")  # one mask per predicted class
INSTANCE_ROWS = ("gencnp", "instance_optimum", "instance_optimum_from_gencnp")  # one per image
ROWS = ("gencnp", "class_constant", "class_optimum", "instance_optimum")
ROWS += ("instance_optimum_from_gencnp",)


def _logits_fn(classifier, images):
    return lambda masks_BxN: classifier.logits(
        images, gates_lib.unflatten(masks_BxN, classifier.site_channels)
    )


@jax.jit
def _optimise(classifier, images, full, theta, onehot, density, opt: oracle.OracleSettings):
    """The oracle's Adam loop over free scores (`onehot` None: one row per image)."""
    expand = (lambda t: t) if onehot is None else (lambda t: onehot @ t)
    logits_fn = _logits_fn(classifier, images)
    return oracle.optimise_ranking(logits_fn, full, theta, expand, density, opt)


@jax.jit
def _score(classifier, images, full, masks_BxN):
    """``(logits, mean KL)`` of the masks."""
    logits = _logits_fn(classifier, images)(masks_BxN)
    return logits, jnp.mean(losses.kl_rows(full, logits))


def headroom(config, workdir: str) -> dict:
    """Scores GEN-CNP, the class mask and both fixed-density optima (see module doc)."""
    t0, h = time.time(), config.headroom
    ex = explainer.Explainer.from_workdir(workdir, config)
    mesh, classifier = ex.mesh, ex.classifier
    test = inputs.load_data(config, "test")
    n = min(len(test.labels), int(h.num_examples), int(config.eval.num_examples or 1 << 30))
    n -= n % mesh.size
    if n <= 0:
        raise ValueError(f"headroom needs at least {mesh.size} test images (one per device)")
    images_u8 = test.images[:n]
    pathway = ex(images_u8)
    gen_BxN = np.asarray(gates_lib.flatten(pathway.scores))
    full_BxK = np.asarray(pathway.full_logits)
    classes_B = full_BxK.argmax(-1)
    k = classifier.num_classes
    onehot_BxK = np.eye(k, dtype=np.float32)[classes_B]
    images, full, onehot = sharding.shard_batch(
        mesh, inputs.normalize(config, images_u8), full_BxK, onehot_BxK
    )
    opt_settings = oracle.OracleSettings(
        steps=jnp.int32(h.steps),
        learning_rate=jnp.float32(h.learning_rate),
        rel_temperature=jnp.float32(daq.TOP_FRACTION_WIDTH),
    )
    _, class_mean_KxN = controls.class_mean_scores(gen_BxN, classes_B, k)
    key = jax.random.key(config.seed + 23)
    densities = tuple(float(d) for d in config.eval.densities)
    bar = writers.progress(len(densities) * 4, desc="headroom")
    per_density = {}
    from_gen = sharding.shard_batch(mesh, np.asarray(oracle.standardise_rows(gen_BxN)))
    for density in densities:
        opt = functools.partial(
            _optimise, classifier, images, full, density=jnp.float32(density), opt=opt_settings
        )
        instance_gen_BxN = sharding.to_host(opt(from_gen, onehot=None)[0])
        bar.update(1)
        # the class optimum from two starts, the better kept: GEN-CNP's class means, and the
        # class means of the instance optima (straight-through top-k finds local optima)
        starts = {
            "gencnp_class_means": class_mean_KxN,
            "instance_optimum_class_means": controls.class_mean_scores(
                np.asarray(oracle.standardise_rows(instance_gen_BxN)), classes_B, k
            )[1],
        }
        fits = {}
        for name, start_KxN in starts.items():
            start_KxN = sharding.replicate(mesh, oracle.standardise_rows(start_KxN))
            fits[name] = sharding.to_host(opt(start_KxN, onehot=onehot))
            bar.update(1)
        class_start = min(fits, key=lambda name: float(fits[name][2]))
        class_theta_KxN = fits[class_start][0]
        from_class = sharding.shard_batch(mesh, class_theta_KxN[classes_B])
        instance_BxN = sharding.to_host(opt(from_class, onehot=None)[0])
        bar.update(1)
        scores = {
            "gencnp": gen_BxN,
            "class_constant": class_mean_KxN[classes_B],
            "class_optimum": class_theta_KxN[classes_B],
            "instance_optimum": instance_BxN,
            "instance_optimum_from_gencnp": instance_gen_BxN,
        }
        row = {}
        for name, scores_BxN in scores.items():
            masks = baselines.top_k_at_density(jnp.asarray(scores_BxN), density, key)
            masks = sharding.shard_batch(mesh, np.asarray(masks))
            logits, kl = sharding.to_host(_score(classifier, images, full, masks))
            row[name] = {
                "mDC": float(metrics.mDC(full_BxK, logits)),
                "agreement": float(metrics.agreement(full_BxK, logits)),
                "kl": float(kl),
            }
        best_class = controls.better_source({name: row[name]["mDC"] for name in CLASS_ROWS})
        best_instance = controls.better_source({name: row[name]["mDC"] for name in INSTANCE_ROWS})
        gain = controls.specificity_gain(row[best_class]["mDC"], row[best_instance]["mDC"])
        row["class_optimum_start"] = class_start
        row["best_class_mask"], row["best_instance_mask"] = best_class, best_instance
        row["headroom_gain"] = gain if int(h.steps) > 0 else None  # 0 steps: no optima
        row["gencnp_gain"] = controls.specificity_gain(
            row["class_constant"]["mDC"], row["gencnp"]["mDC"]
        )
        per_density[str(density)] = row
    bar.close()
    results = {
        "num_examples": n,
        "ablation": config.generator.ablation,
        "steps": int(h.steps),
        "learning_rate": float(h.learning_rate),
        "at_density": per_density,
        "seconds": round(time.time() - t0, 2),
    }
    out_dir = workdir_lib.eval_dir(workdir)
    writers.write_json(os.path.join(out_dir, "headroom.json"), results)
    writers.write_text(os.path.join(out_dir, "headroom.md"), table(results))
    print(table(results))
    return results


def table(results: dict) -> str:
    """A markdown table of `headroom` results: mDC (agreement) per row and density."""
    ds = list(results["at_density"])
    lines = [
        f"# Fixed-density headroom ({results['num_examples']} test images, "
        f"{results['ablation']} ablation, {results['steps']} Adam steps)",
        "",
        "| mask | " + " | ".join(f"mDC (agreement) @ {d}" for d in ds) + " |",
        "|---|" + "---|" * len(ds),
    ]
    for name in ROWS:
        cells = [results["at_density"][d][name] for d in ds]
        cells = [f"{c['mDC']:.1f} ({c['agreement']:.3f})" for c in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for gain in ("headroom_gain", "gencnp_gain"):
        values = [results["at_density"][d][gain] for d in ds]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in values]
        lines.append(f"| {gain} | " + " | ".join(cells) + " |")
    for best in ("best_class_mask", "best_instance_mask"):  # what headroom_gain divides
        lines.append(f"| {best} | " + " | ".join(results["at_density"][d][best] for d in ds) + " |")
    return "\n".join(lines) + "\n"
