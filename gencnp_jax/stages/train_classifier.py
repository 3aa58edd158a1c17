"""Trains the target classifier `H`: one jit-compiled, sharded step; orbax resume.

Writes `WORKDIR/classifier/{checkpoints,final,metrics.json,metrics.jsonl,tb}`.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gencnp_jax.io import checkpointing, data, sharding
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.models import classifiers
from gencnp_jax.stages import context


def make_optimizer(lr: float, weight_decay: float, warmup: int, total: int, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total - 1), total)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay)
    )


def channel_dropout_gates(key, site_channels, batch: int, rate: jax.Array, variable: jax.Array):
    """Channel dropout expressed as gates at every site.

    Fixed mode (`variable` = 0): inverted dropout at `rate` (kept channels scaled by
    1/(1-rate)). Variable mode (`variable` = 1): each sample draws its own rate from
    U(0, rate) and kept channels are *not* rescaled, so the classifier trains on exactly
    the kind of 0/1-gated inputs it is explained with, at densities from 1 down to 1-rate.
    """
    rate_key, *keys = jax.random.split(key, len(site_channels) + 1)
    sample_rate_B = jax.random.uniform(rate_key, (batch,), maxval=rate)
    rate_B = jnp.where(variable > 0, sample_rate_B, rate)[:, None]
    keep_B = 1.0 - rate_B
    scale_B = jnp.where(variable > 0, 1.0, 1.0 / keep_B)
    return {
        site: jax.random.bernoulli(k, keep_B, (batch, c)).astype(jnp.float32) * scale_B
        for k, (site, c) in zip(keys, sorted(site_channels.items()), strict=True)
    }


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, site_channels):
    """`step(state, images, labels, key, dropout, variable) -> (state, metrics)`, compiled once.

    `dropout` is the channel-dropout rate at every gate site (0 = none): it trains the
    classifier to tolerate closed channels, the redundancy sparse pathways need.
    """

    def step(state, images_BxHxWxC, labels_B, key, dropout, variable):
        model = nnx.merge(graphdef, state["params"], state["rest"])
        gates = channel_dropout_gates(
            key, site_channels, images_BxHxWxC.shape[0], dropout, variable
        )

        def loss_fn(model):
            logits_BxK, _ = model(images_BxHxWxC, gates, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B).mean()
            return loss, jnp.mean(jnp.argmax(logits_BxK, -1) == labels_B)

        (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "rest": rest,
            "opt_state": opt_state,
        }
        return new_state, {"train/loss": loss, "train/accuracy": accuracy}

    return jax.jit(step, donate_argnums=0)


def make_predict(graphdef: nnx.GraphDef):
    """`predict(state, images, gates=None) -> logits`, jit-compiled (gates optional)."""
    return jax.jit(
        lambda state, images, gates=None: classifiers.forward(graphdef, state, images, gates)[0]
    )


def predict_split(predict, state, images_uint8, config, mesh, batch_size, gates_fn=None):
    """Logits for a whole split in padded fixed-size batches (one compilation)."""
    out = []
    for idx, valid in data.eval_batches(len(images_uint8), batch_size):
        images = sharding.shard_batch(mesh, context.normalize(config, images_uint8[idx]))
        gates = None if gates_fn is None else gates_fn(idx)
        out.append(np.asarray(sharding.to_host(predict(state, images, gates)))[:valid])
    return np.concatenate(out)


def random_drop_agreement(predict, state, split, config, mesh, site_channels, full_pred, frac=0.1):
    """Agreement with the full model when `frac` of all channels are closed at random."""
    bs = config.classifier.eval_batch_size
    rng = np.random.default_rng(config.seed)
    masks = {
        s: (rng.random((len(split.labels), c)) >= frac).astype(np.float32)
        for s, c in site_channels.items()
    }
    gates_fn = lambda idx: {s: sharding.shard_batch(mesh, m[idx]) for s, m in masks.items()}
    logits = predict_split(predict, state, split.images, config, mesh, bs, gates_fn)
    return float(np.mean(logits.argmax(-1) == full_pred))


def train_classifier(config, workdir: str) -> dict:
    """Trains (or resumes) the classifier and writes `classifier/metrics.json`."""
    c = config.classifier
    out_dir = context.classifier_dir(workdir)
    train, test = context.load_data(config, "train"), context.load_data(config, "test")
    mesh = context.make_mesh(config)
    sharding.check_batch_size(mesh, c.batch_size)
    sharding.check_batch_size(mesh, c.eval_batch_size)  # fail now, not after training
    model, template = context.classifier_template(config)
    graphdef = nnx.graphdef(model)
    steps_per_epoch = len(train.labels) // c.batch_size
    total = max(1, math.ceil(c.epochs * steps_per_epoch))
    tx = make_optimizer(c.learning_rate, c.weight_decay, c.warmup_steps, total, c.grad_clip)
    state = {**template, "opt_state": tx.init(template["params"])}
    ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "checkpoints"))
    restored = ckpt.restore(state)
    start = 0 if restored is None else restored[0]
    if restored is not None:
        state = restored[1]
    state = sharding.replicate(mesh, state)
    step_fn = make_train_step(graphdef, tx, dict(model.site_channels))
    dropout = jnp.float32(c.channel_dropout)
    variable = jnp.float32(c.dropout_mode == "variable")
    root_key = jax.random.key(config.seed)
    writer = logging_utils.MetricWriter(out_dir)
    bar = logging_utils.progress(total, start, "train_classifier")
    t0, pending = time.time(), None
    for step in range(start, total):
        idx = data.batch_indices(len(train.labels), c.batch_size, config.seed, step)
        images, labels = sharding.shard_batch(
            mesh, context.normalize(config, train.images[idx]), train.labels[idx]
        )
        key = jax.random.fold_in(root_key, step)
        state, metrics = step_fn(state, images, labels, key, dropout, variable)
        if pending is not None:  # the previous step's metrics: no host stall on this one
            _log(writer, bar, *pending)
        pending = (step + 1, metrics) if (step + 1) % c.log_every == 0 else None
        bar.update(1)
        if (step + 1) % c.checkpoint_every == 0 and step + 1 < total:
            check_finite(step + 1, metrics)  # never checkpoint a diverged state
            ckpt.save(step + 1, state)
    if pending is not None:
        _log(writer, bar, *pending)
    elif start < total:
        check_finite(total, metrics)
    bar.close()
    ckpt.save(total, state)
    ckpt.close()
    train_seconds = time.time() - t0
    final = {"params": state["params"], "rest": state["rest"]}
    final_ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final_ckpt.save(total, final)
    final_ckpt.close()
    return _evaluate(
        config,
        workdir,
        graphdef,
        final,
        model,
        train,
        test,
        mesh,
        total,
        train_seconds,
        start,
        writer,
    )


def check_finite(step: int, metrics: dict) -> dict[str, float]:
    """The metrics as floats; FloatingPointError naming the non-finite loss terms and `step`.

    Loss terms (`loss/kd`, `train/loss`...) are named first, the most specific first: when
    one term alone diverges, `loss/total` and the term are the only non-finite losses.
    """
    values = {k: float(v) for k, v in metrics.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if not bad:
        return values
    losses = sorted((k for k in bad if "loss" in k), key=lambda k: (k.endswith("total"), k))
    others = [k for k in bad if k not in losses]
    what = ", ".join(losses) if losses else ", ".join(others[:3])
    also = f" (and {len(others)} other non-finite metrics)" if losses and others else ""
    raise FloatingPointError(
        f"non-finite {what} at step {step}{also}: training stopped before saving this state; "
        f"lower this stage's learning_rate in the config and rerun (it resumes from the last "
        f"checkpoint)"
    )


def _log(writer, bar, step, metrics):
    values = check_finite(step, metrics)
    writer.write(step, values)
    shown = {
        k.split("/")[-1]: f"{v:.3f}" for k, v in values.items() if k.startswith(("loss/", "train/"))
    }
    bar.set_postfix(shown)


def _evaluate(
    config, workdir, graphdef, final, model, train, test, mesh, total, secs, start, writer
):
    full_model = nnx.merge(graphdef, final["params"], final["rest"])
    gd, full_state = nnx.split(full_model)
    predict = make_predict(gd)
    bs = config.classifier.eval_batch_size
    logits = predict_split(predict, full_state, test.images, config, mesh, bs)
    pred = logits.argmax(-1)
    metrics = {
        "test_accuracy": float(np.mean(pred == test.labels)),
        "num_params": classifiers.num_params(full_state),
        "random_drop10_agreement": random_drop_agreement(
            predict, full_state, test, config, mesh, model.site_channels, pred
        ),
        "train_steps": total,
        "train_seconds": secs,
        "train_steps_per_second": (total - start) / max(secs, 1e-9),
        "resumed_from_step": start,
        "num_devices": mesh.size,
        "site_channels": dict(model.site_channels),
    }
    writer.write(total, {"test/accuracy": metrics["test_accuracy"]})
    writer.close()
    logging_utils.write_json(os.path.join(context.classifier_dir(workdir), "metrics.json"), metrics)
    return metrics
