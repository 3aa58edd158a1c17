"""Trains the target classifier `H`: one jit-compiled, sharded step; orbax resume.

Writes `WORKDIR/classifier/{checkpoints,final,metrics.json,metrics.jsonl,tb}`.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import perturbation
from gencnp_jax.io import batched, checkpointing, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.models import classifiers
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.train import batchnorm
from gencnp_jax.train import fills as fills_lib
from gencnp_jax.train import loop as train_loop

check_finite = train_loop.check_finite  # kept here too: callers know it as the trainers' guard


def make_optimizer(lr: float, weight_decay: float, warmup: int, total: int, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total - 1), total)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay)
    )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """`step(state, batch) -> (state, metrics)`, compiled once.

    `batch` is ``{"images": f32[B, H, W, C], "labels": i32[B]}``; `state` a
    `train_loop.TrainState` (donated). The classifier trains as users train theirs: every
    gate open (a classifier trained to survive random masks makes any mask look faithful).
    """

    def step(state: train_loop.TrainState, batch):
        images_BxHxWxC, labels_B = batch["images"], batch["labels"]
        model = nnx.merge(graphdef, state.params, state.rest)

        def loss_fn(model):
            logits_BxK, _ = model(images_BxHxWxC, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B).mean()
            return loss, jnp.mean(jnp.argmax(logits_BxK, -1) == labels_B)

        (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        new_state = train_loop.TrainState(optax.apply_updates(params, updates), rest, opt_state)
        return new_state, {"train/loss": loss, "train/accuracy": accuracy}

    return jax.jit(step, donate_argnums=0)


def init_state(config, model: nnx.Module, total: int):
    """`(graphdef, tx, TrainState)` of `model` with the config's optimizer over `total` steps."""
    c = config.classifier
    tx = make_optimizer(
        c.learning_rate, c.weight_decay, c.warmup_steps, total, config.train.grad_clip
    )
    graphdef, state = train_loop.TrainState.create(model, tx)
    return graphdef, tx, state


def bound_step(graphdef: nnx.GraphDef, tx) -> train_loop.BoundStep:
    """The classifier's train step (it takes nothing but the state and the batch)."""
    return train_loop.BoundStep(make_train_step(graphdef, tx), lambda step: ())


@jax.jit
def _logits(classifier: FrozenClassifier, images, gates=None):
    return classifier.logits(images, gates)


def predict_split(config, classifier: FrozenClassifier, images_uint8, mesh, gates_fn=None):
    """Logits for a whole split in padded batches of ``train.eval_batch_size`` (one
    compilation); `classifier`'s fills take closed gates.

    `gates_fn(indices) -> host gates` of those rows (None: every gate open).
    """
    placed = sharding.replicate(mesh, classifier)
    make_batch = lambda idx: {
        "images": inputs.normalize(config, images_uint8[idx]),
        "gates": None if gates_fn is None else gates_fn(idx),
    }
    run = lambda batch: _logits(placed, batch["images"], batch["gates"])
    batch_size = config.train.eval_batch_size
    return batched.map_batches(run, make_batch, len(images_uint8), batch_size, mesh)


def random_drop_agreements(
    config, classifier: FrozenClassifier, split, mesh, full_pred, means, frac=0.1
) -> dict[str, float]:
    """Agreement with the full model when `frac` of all channels are closed at random.

    Returns:
      ``{"zero": agreement, "mean": agreement}``: the closed channels at 0, and the same
      channels closed to their training-set mean `means` (mean ablation).
    """
    rng = np.random.default_rng(config.seed)
    masks = {
        s: (rng.random((len(split.labels), c)) >= frac).astype(np.float32)
        for s, c in classifier.site_channels.items()
    }
    gates_fn = lambda idx: {s: m[idx] for s, m in masks.items()}
    out = {}
    for name, fills in (("zero", None), ("mean", means)):
        logits = predict_split(config, classifier.with_fills(fills), split.images, mesh, gates_fn)
        out[name] = float(np.mean(logits.argmax(-1) == full_pred))
    return out


def train_classifier(config, workdir: str) -> dict:
    """Trains (or resumes) the classifier and writes `classifier/metrics.json`.

    The BatchNorm statistics of the final classifier are then re-estimated exactly on the
    training split with every gate open (`batchnorm.reestimate_batchnorm`): the running
    averages of training are those of still-moving weights.
    """
    c = config.classifier
    out_dir = workdir_lib.classifier_dir(workdir)
    train, test = inputs.load_data(config, "train"), inputs.load_data(config, "test")
    mesh = inputs.make_mesh(config)
    t = config.train
    sharding.check_batch_size(mesh, t.batch_size)
    sharding.check_batch_size(mesh, t.eval_batch_size)  # fail now, not after training
    model, _ = loading.classifier_template(config)
    steps_per_epoch = len(train.labels) // t.batch_size
    total = max(1, math.ceil(c.epochs * steps_per_epoch))
    graphdef, tx, state = init_state(config, model, total)
    norm = lambda x: inputs.normalize(config, x)
    batch_at = train_loop.batches_at(
        mesh,
        lambda idx: {"images": norm(train.images[idx]), "labels": train.labels[idx]},
        len(train.labels),
        t.batch_size,
        config.seed,
    )
    writer = writers.MetricWriter(out_dir)
    with timings.phase("steps"):
        result = train_loop.run(
            bound_step(graphdef, tx),
            state,
            batch_at,
            total,
            mesh,
            train_loop.LoopOptions(
                log_every=t.log_every,
                checkpoint_every=t.checkpoint_every,
                desc="train_classifier",
                ckpt_dir=os.path.join(out_dir, "checkpoints"),
                writer=writer,
            ),
        )
    full_model = nnx.merge(graphdef, result.state.params, result.state.rest)
    full_graphdef, full_state = nnx.split(full_model)
    with timings.phase("batchnorm"):
        full_state = batchnorm.reestimate_batchnorm(
            full_graphdef,
            full_state,
            lambda idx: norm(train.images[idx]),
            len(train.labels),
            t.eval_batch_size,
            mesh,
        )
    _, params, rest = nnx.split(nnx.merge(full_graphdef, full_state), nnx.Param, ...)
    final_ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final_ckpt.save(total, {"params": params, "rest": rest})
    final_ckpt.close()
    classifier = FrozenClassifier(
        full_graphdef, full_state, model.site_channels, inputs.num_classes(config)
    )
    with timings.phase("metrics"):
        metrics = evaluate_classifier(config, classifier, {"train": train, "test": test}, mesh)
    metrics.update(
        train_steps=total,
        train_seconds=result.seconds,
        train_steps_per_second=(total - result.start) / max(result.seconds, 1e-9),
        resumed_from_step=result.start,
        num_devices=mesh.size,
        site_channels=dict(model.site_channels),
    )
    writer.write(total, {"test/accuracy": metrics["test_accuracy"]})
    writer.close()
    writers.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


def evaluate_classifier(config, classifier: FrozenClassifier, splits: dict, mesh) -> dict:
    """Test accuracy, size and random-drop agreements (zero and mean ablation) of `classifier`.

    Args:
      splits: ``{"train": ArraySplit, "test": ArraySplit}``; the train split gives the
        channel means of mean ablation.
    """
    test = splits["test"]
    pred = predict_split(config, classifier, test.images, mesh).argmax(-1)
    norm = lambda x: inputs.normalize(config, x)
    means = fills_lib.channel_means(
        classifier, splits["train"].images, norm, config.train.eval_batch_size, mesh
    )
    drops = random_drop_agreements(config, classifier, test, mesh, pred, means)
    return {
        "test_accuracy": float(np.mean(pred == test.labels)),
        "num_params": classifiers.num_params(classifier.state),
        "random_drop10_agreement": drops["zero"],
        "random_drop10_agreement_mean_ablation": drops["mean"],
    }


def randomized_classifier(
    config, classifier: FrozenClassifier, train_split, mesh, seed: int
) -> FrozenClassifier:
    """`classifier` with every weight re-drawn and its BatchNorm statistics re-estimated.

    The model-randomisation sanity check's classifier: `perturbation.randomize_weights`
    re-draws the Params; the trained BatchNorm statistics would then normalise activations
    they were never measured on, so they are re-estimated on `train_split` (all gates open).
    """
    state = perturbation.randomize_weights(classifier.state, seed)
    state = batchnorm.reestimate_batchnorm(
        classifier.graphdef,
        state,
        lambda idx: inputs.normalize(config, train_split.images[idx]),
        len(train_split.labels),
        config.train.eval_batch_size,
        mesh,
    )
    return classifier.with_state(state)
