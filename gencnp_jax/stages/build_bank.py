"""The build_bank stage: class pathways of `j` training samples per class, stored with orbax
beside a fingerprint of the classifier, and loaded back only for that classifier
(docs/METHOD.md §5).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.context import inputs, loading
from gencnp_jax.io import batched, checkpointing, data, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import explain
from gencnp_jax.method.class_bank import (
    CLASS_SOURCES,
    ClassBank,
    aggregate,
    class_means,
    first_per_class,
)
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier

log = logging.getLogger(__name__)


BANK_JSON = "bank.json"
BANK_FORMAT = 2  # 2: the checkpoint also holds score_mean (1: freq, masks, counts)


class BankMismatchError(Exception):
    """A stored bank does not belong to the classifier (or config) it is loaded against."""


bank_dir = workdir_lib.bank_dir


def fingerprint(cls_state, site_channels: Mapping[str, int]) -> str:
    """sha256 of the classifier: its state's leaves by path, then its sites with channels."""
    return checkpointing.tree_checksum(
        cls_state, by_path=True, suffix=repr(sorted(site_channels.items()))
    )


def _check_source(class_source: str) -> None:
    if class_source not in CLASS_SOURCES:
        raise ValueError(
            f"config.bank.class_source={class_source!r}: choose one of {CLASS_SOURCES}"
        )


def _select(config, classifier, train: data.ArraySplit, mesh) -> tuple[np.ndarray, np.ndarray, int]:
    """``(indices, classes, scanned)``: the first j training samples of each class.

    By prediction, the split is scanned in batches only until every class has j samples.
    """
    j, num_classes = config.bank.samples_per_class, classifier.num_classes
    if config.bank.class_source == "label":
        idx = first_per_class(train.labels, num_classes, j)
        return idx, train.labels[idx].astype(np.int32), len(train.labels)
    predict = jax.jit(lambda c, x: jnp.argmax(c.logits(x), -1))
    with writers.progress(len(train.labels), desc="bank: predictions") as bar:
        preds_N = batched.map_batches(
            lambda images: predict(classifier, images),
            lambda idx: inputs.normalize(config, train.images[idx]),
            len(train.labels),
            config.eval.batch_size,
            mesh,
            progress=bar.update,
            stop=lambda preds: np.bincount(preds, minlength=num_classes).min() >= j,
        )
    idx = first_per_class(preds_N, num_classes, j)
    return idx, preds_N[idx].astype(np.int32), len(preds_N)


def save_bank(
    bank: ClassBank, workdir: str, site_order: list[str], extra: dict | None = None
) -> dict:
    """Writes the bank checkpoint, then `bank/bank.json` (the stage's completion marker), last.

    Returns:
      The metadata written to bank.json.
    """
    ckpt_dir = os.path.join(bank_dir(workdir), "checkpoint")
    if jax.process_index() == 0 and os.path.exists(ckpt_dir):
        shutil.rmtree(ckpt_dir)  # a rebuilt bank replaces the old one (save keeps existing steps)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bank: old checkpoint removed")
    counts = [int(n) for n in np.asarray(bank.counts)]
    meta = {
        "samples_per_class": bank.samples_per_class,
        "threshold": bank.threshold,
        "class_source": bank.class_source,
        "fingerprint": bank.fingerprint,
        "format": BANK_FORMAT if bank.score_mean is not None else 1,
        "num_classes": bank.num_classes,
        "sites": list(site_order),
        "site_channels": {s: bank.site_channels[s] for s in site_order},
    }
    ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=1)
    tree = {"freq": bank.freq, "masks": bank.masks, "counts": bank.counts}
    if bank.score_mean is not None:
        tree["score_mean"] = bank.score_mean
    ckpt.save(0, tree, meta)
    ckpt.close()
    summary = {
        **meta,
        "counts": counts,
        "empty_classes": [c for c, n in enumerate(counts) if n == 0],
        "class_density": [float(d) for d in bank.class_density()],
        "class_site_density": {
            s: [float(v) for v in np.asarray(m).mean(-1)] for s, m in bank.masks.items()
        },
        **(extra or {}),
    }
    writers.write_json(os.path.join(bank_dir(workdir), BANK_JSON), summary)
    return summary


def _mismatch(workdir: str, why: str) -> BankMismatchError:
    return BankMismatchError(
        f"the class-pathway bank in {bank_dir(workdir)} was built for another classifier or "
        f"config ({why}): rebuild it with `python launch.py --config=... --workdir={workdir} "
        f"--mode=build_bank`"
    )


def load_bank(config, workdir: str, classifier: FrozenClassifier) -> ClassBank:
    """Restores the bank of `workdir` and checks it belongs to `classifier` and `config.bank`.

    Raises:
      workdir_lib.StageOrderError: no bank in `workdir`.
      BankMismatchError: other gate sites, other classifier weights, or other bank settings.
    """
    meta = writers.read_json(os.path.join(bank_dir(workdir), BANK_JSON))
    if meta is None:
        raise workdir_lib.StageOrderError(
            f"no class-pathway bank in {bank_dir(workdir)}: run `python launch.py --config=... "
            f"--workdir={workdir} --mode=build_bank` first"
        )
    sites = dict(classifier.site_channels)
    if meta["site_channels"] != sites or meta["num_classes"] != classifier.num_classes:
        raise _mismatch(
            workdir,
            f"bank sites {meta['site_channels']} and "
            f"{meta['num_classes']} classes, classifier sites {sites} and "
            f"{classifier.num_classes} classes",
        )
    k = meta["num_classes"]
    template = {
        "freq": {s: np.zeros((k, c), np.float32) for s, c in sites.items()},
        "masks": {s: np.zeros((k, c), np.float32) for s, c in sites.items()},
        "counts": np.zeros((k,), np.int32),
    }
    if meta.get("format", 1) >= 2:  # format 1 banks have no score_mean: rank by F_c alone
        template["score_mean"] = {s: np.zeros((k, c), np.float32) for s, c in sites.items()}
    ckpt = checkpointing.Checkpointer(os.path.join(bank_dir(workdir), "checkpoint"), max_to_keep=1)
    restored = ckpt.restore(template)
    ckpt.close()
    if restored is None:
        raise workdir_lib.StageOrderError(
            f"{bank_dir(workdir)} has bank.json but no checkpoint: rerun --mode=build_bank"
        )
    _, tree, stored = restored
    current = fingerprint(classifier.state, sites)
    if stored.get("fingerprint") != current:
        raise _mismatch(
            workdir,
            f"classifier fingerprint {stored.get('fingerprint', '?')[:12]} "
            f"in the bank, {current[:12]} now: the classifier's weights differ",
        )
    b = config.bank
    wanted = {
        "samples_per_class": b.samples_per_class,
        "threshold": b.threshold,
        "class_source": b.class_source,
    }
    differ = {f: (stored.get(f), v) for f, v in wanted.items() if stored.get(f) != v}
    if differ:
        raise _mismatch(
            workdir,
            "bank vs config.bank: "
            + ", ".join(f"{f} {a!r} vs {v!r}" for f, (a, v) in differ.items()),
        )
    return ClassBank(
        freq=dict(tree["freq"]),
        masks=dict(tree["masks"]),
        counts=jnp.asarray(tree["counts"]),
        samples_per_class=stored["samples_per_class"],
        threshold=stored["threshold"],
        class_source=stored["class_source"],
        fingerprint=current,
        score_mean=dict(tree["score_mean"]) if "score_mean" in tree else None,
    )


def build_bank(config, workdir: str) -> dict:
    """Builds the class-pathway bank of `workdir` (launch.py ``--mode=build_bank``).

    Takes the first ``j = config.bank.samples_per_class`` training samples of each class (by
    the classifier's prediction or by label, `config.bank.class_source`), explains them with
    the trained generator, and stores ``F_c`` and ``F_c >= config.bank.threshold``. Classes with
    fewer samples use what there is (`counts` in bank.json); a class with none gets an empty
    pathway and is listed in ``empty_classes`` (with a warning).

    Returns:
      The metadata written to ``WORKDIR/bank/bank.json``.
    """
    _check_source(config.bank.class_source)
    t0 = time.time()
    classifier = loading.load_classifier(config, workdir)
    generator, classifier, _ = loading.load_generator(config, workdir, classifier)
    train = inputs.load_data(config, "train")
    mesh = inputs.make_mesh(config)
    sharding.check_batch_size(mesh, config.eval.batch_size)
    generator, classifier = sharding.replicate(mesh, (generator, classifier))
    with timings.phase("select"):
        idx_M, classes_M, scanned = _select(config, classifier, train, mesh)
    g = config.generator.daq
    settings = daq.Settings.create(g.temperature, g.sigma)

    def gates_and_scores(x):
        pathway = explain.jit_explain(generator, classifier, x, settings)
        return pathway.gates, pathway.scores

    with timings.phase("explain"), writers.progress(len(idx_M), desc="bank: pathways") as bar:
        gates_M, scores_M = batched.map_batches(
            gates_and_scores,
            lambda rows: inputs.normalize(config, train.images[idx_M[rows]]),
            len(idx_M),
            config.eval.batch_size,
            mesh,
            progress=bar.update,
        )
    gates_M = {s: jnp.asarray(v) for s, v in gates_M.items()}
    classes_M = jnp.asarray(classes_M)
    freq, masks, counts = aggregate(
        gates_M, classes_M, classifier.num_classes, config.bank.threshold
    )
    scores_M = {s: jnp.asarray(v, jnp.float32) for s, v in scores_M.items()}
    score_mean, _ = class_means(scores_M, classes_M, classifier.num_classes)
    bank = ClassBank(
        freq,
        masks,
        counts,
        config.bank.samples_per_class,
        float(config.bank.threshold),
        config.bank.class_source,
        fingerprint(classifier.state, classifier.site_channels),
        score_mean,
    )
    short = [(c, int(n)) for c, n in enumerate(np.asarray(counts)) if n < bank.samples_per_class]
    if short:
        log.warning(
            "class-pathway bank: classes with fewer than j=%d samples (class, count): %s",
            bank.samples_per_class,
            short,
        )
    extra = {
        "scanned_train_examples": int(scanned),
        "seconds": round(time.time() - t0, 2),
        "sample_density_mean": float(jnp.mean(gates_lib.density(gates_M))),
    }
    return save_bank(bank, workdir, list(classifier.site_channels), extra)
