"""Trains the GEN-CNP generator against the frozen classifier (DESIGN §4).

One jit-compiled sharded step; the classifier state is a non-donated argument that
no gradient reaches. Writes `WORKDIR/generator/{checkpoints,final,metrics.json,...}`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gencnp_jax.eval import metrics
from gencnp_jax.io import checkpointing, data, sharding
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.method import explain, losses
from gencnp_jax.models import classifiers, daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.stages import context, explainer, train_classifier


@flax.struct.dataclass
class StepHParams:
    """Numbers the step needs, as pytree leaves: changing them never recompiles."""

    temperature: jax.Array
    sigma: jax.Array
    tau: jax.Array
    hinge_margin: jax.Array
    leak_margin: jax.Array
    ramp_steps: jax.Array
    bank_decay: jax.Array


def hparams_from_config(g) -> tuple[StepHParams, losses.LossWeights]:
    f = lambda v: jnp.asarray(v, jnp.float32)
    hp = StepHParams(
        f(g.daq.temperature),
        f(g.daq.sigma),
        f(g.loss.tau),
        f(g.loss.hinge_margin),
        f(g.loss.leak_margin),
        f(g.loss.sparsity_ramp_steps),
        f(g.loss.bank_decay),
    )
    weights = losses.LossWeights.create(
        kd=g.loss.w_kd,
        hinge=g.loss.w_hinge,
        sparsity=g.loss.w_sparsity,
        pdn=g.loss.w_pdn,
        pull=g.loss.w_pull,
        leak=g.loss.w_leak,
    )
    return hp, weights


def _loss_terms(
    model, cls_graphdef, cls_state, fills, images, full_logits, pred, partner, has_partner, bank, hp
):
    """Every loss term of §4 for one batch; one gated pass covers x and its partners x'."""
    features = classifiers.forward(cls_graphdef, cls_state, images)[1]
    scores, q_logits_BxK = model(features)
    gates = daq.binarize_tree(scores, hp.temperature, hp.sigma)
    both_images = jnp.concatenate([images, images[partner]])  # x, then x' gated with P(x)
    both_gates = jax.tree.map(lambda g: jnp.concatenate([g, g]), gates)
    both_logits, _ = classifiers.forward(cls_graphdef, cls_state, both_images, both_gates, fills)
    pathway_logits, partner_logits = jnp.split(both_logits, 2)
    scores_flat = gates_lib.flatten(scores)
    terms = {
        "kd": losses.distillation_kl(full_logits, pathway_logits, hp.tau),
        "hinge": losses.top1_hinge(full_logits, pathway_logits, hp.hinge_margin),
        "sparsity": losses.sparsity(scores),
        "pdn": losses.pdn_kl(full_logits, q_logits_BxK),
        "pull": losses.class_pull(scores_flat, bank["scores"], pred, bank["counts"]),
        "leak": losses.leakage_hinge(
            full_logits[partner], partner_logits, pred, has_partner, hp.leak_margin
        ),
    }
    return terms, gates, pathway_logits, scores_flat


def make_train_step(gen_graphdef: nnx.GraphDef, cls_graphdef: nnx.GraphDef, tx):
    """`step(gen, bank, cls_state, fills, images, step, weights, hp) -> (gen, bank, metrics)`."""

    def step(gen, bank, cls_state, fills, images, step_idx, weights, hp):
        full_logits = classifiers.forward(cls_graphdef, cls_state, images)[0]
        pred = jnp.argmax(full_logits, -1)
        partner, has_partner = losses.partner_indices(pred)
        w = weights.replace(
            sparsity=losses.sparsity_ramp(step_idx, hp.ramp_steps, weights.sparsity)
        )
        model = nnx.merge(gen_graphdef, gen["params"], gen["rest"])

        def loss_fn(model):
            terms, gates, pathway_logits, scores_flat = _loss_terms(
                model,
                cls_graphdef,
                cls_state,
                fills,
                images,
                full_logits,
                pred,
                partner,
                has_partner,
                bank,
                hp,
            )
            loss, aux = losses.total_loss(terms, w)
            return loss, (aux, gates, pathway_logits, scores_flat)

        (_, (aux, gates, pathway_logits, scores_flat)), grads = nnx.value_and_grad(
            loss_fn, has_aux=True
        )(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, gen["opt_state"], params)
        new_gen = {
            "params": optax.apply_updates(params, updates),
            "rest": gen["rest"],
            "opt_state": opt_state,
        }
        new_scores, new_counts = losses.bank_ema_update(
            bank["scores"], bank["counts"], scores_flat, pred, hp.bank_decay
        )
        density_B = gates_lib.density(gates)
        out = {
            **aux,
            "train/density": jnp.mean(density_B),
            "train/density_std": jnp.std(density_B),
            "train/agreement": metrics.agreement(full_logits, pathway_logits),
            **{f"gates/{s}/density": jnp.mean(d) for s, d in gates_lib.site_density(gates).items()},
        }
        return new_gen, {"scores": new_scores, "counts": new_counts}, out

    return jax.jit(step, donate_argnums=(0, 1))


def _init(config, classifier):
    g = config.generator
    model = explainer.new_generator(config, classifier.site_channels, classifier.num_classes)
    gen_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train_classifier.make_optimizer(
        g.opt.learning_rate, 0.0, g.opt.warmup_steps, g.steps, g.opt.grad_clip
    )
    n = sum(classifier.site_channels.values())
    gen = {"params": params, "rest": rest, "opt_state": tx.init(params)}
    bank = {
        "scores": jnp.zeros((classifier.num_classes, n), jnp.float32),
        "counts": jnp.zeros((classifier.num_classes,), jnp.float32),
    }
    return gen_graphdef, tx, gen, bank


def train_generator(config, workdir: str) -> dict:
    """Trains (or resumes) the generator; writes `generator/metrics.json` on the test split."""
    g = config.generator
    classifier = context.load_classifier(config, workdir)
    out_dir = explainer.generator_dir(workdir)
    train, test = context.load_data(config, "train"), context.load_data(config, "test")
    mesh = context.make_mesh(config)
    sharding.check_batch_size(mesh, g.batch_size)
    sharding.check_batch_size(mesh, g.eval_batch_size)  # fail now, not after training
    norm = lambda x: context.normalize(config, x)
    means = explain.channel_means(classifier.graphdef, classifier.state, train.images, norm)
    fills = means if g.ablation == "mean" else None
    gen_graphdef, tx, gen, bank = _init(config, classifier)
    ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "checkpoints"))
    restored = ckpt.restore({"gen": gen, "bank": bank})
    start = 0 if restored is None else restored[0]
    if restored is not None:
        gen, bank = restored[1]["gen"], restored[1]["bank"]
    gen, bank, cls_state, fills_dev = sharding.replicate(mesh, (gen, bank, classifier.state, fills))
    hp, weights = sharding.replicate(mesh, hparams_from_config(g))
    classifier = dataclasses.replace(classifier, state=cls_state)
    step_fn = make_train_step(gen_graphdef, classifier.graphdef, tx)
    writer = logging_utils.MetricWriter(out_dir)
    bar = logging_utils.progress(g.steps, start, "train_generator")
    t0, pending = time.time(), None
    for step in range(start, g.steps):
        idx = data.batch_indices(len(train.labels), g.batch_size, config.seed + 1, step)
        images = sharding.shard_batch(mesh, norm(train.images[idx]))
        gen, bank, out = step_fn(
            gen, bank, cls_state, fills_dev, images, jnp.int32(step), weights, hp
        )
        if pending is not None:
            train_classifier._log(writer, bar, *pending)
        pending = (step + 1, out) if (step + 1) % g.log_every == 0 else None
        bar.update(1)
        if (step + 1) % g.checkpoint_every == 0 and step + 1 < g.steps:
            train_classifier.check_finite(step + 1, out)  # never checkpoint a diverged state
            ckpt.save(step + 1, {"gen": gen, "bank": bank})
    if pending is not None:
        train_classifier._log(writer, bar, *pending)
    elif start < g.steps:
        train_classifier.check_finite(g.steps, out)
    bar.close()
    seconds = time.time() - t0
    ckpt.save(g.steps, {"gen": gen, "bank": bank})
    ckpt.close()
    gen_state = nnx.merge_state(gen["params"], gen["rest"])
    final = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final.save(g.steps, {"generator": gen_state, "means": means})
    final.close()
    result = evaluate_split(config, classifier, gen_graphdef, gen_state, fills_dev, test, mesh)
    result.update(
        train_seconds=seconds,
        train_steps=g.steps,
        resumed_from_step=start,
        train_steps_per_second=(g.steps - start) / max(seconds, 1e-9),
    )
    writer.write(g.steps, {f"test/{k}": v for k, v in result.items()})
    writer.close()
    logging_utils.write_json(os.path.join(out_dir, "metrics.json"), result)
    return result


def pathway_outputs(gen_graphdef, cls_graphdef, temperature, sigma):
    """A jitted fn: per-instance outputs of GEN-CNP on a batch, for the metrics."""

    def fn(gen_state, cls_state, fills, images):
        p = explain.explain(
            gen_graphdef, gen_state, cls_graphdef, cls_state, images, temperature, sigma, fills
        )
        partner, has_partner = metrics.different_class_partners(p.explained_class)
        partner_logits, _ = classifiers.forward(
            cls_graphdef, cls_state, images[partner], p.gates, fills
        )
        return {
            "full_logits": p.full_logits,
            "pathway_logits": p.pathway_logits,
            "classes": p.explained_class,
            "gates_flat": gates_lib.flatten(p.gates),
            "partner_logits": partner_logits,
            "partner_classes": p.explained_class[partner],
            "has_partner": has_partner,
        }

    return jax.jit(fn)


def evaluate_split(config, classifier, gen_graphdef, gen_state, fills, split, mesh) -> dict:
    """agreement, density, mDC, mIC and leakage of GEN-CNP pathways on a split."""
    g = config.generator
    fn = pathway_outputs(gen_graphdef, classifier.graphdef, g.daq.temperature, g.daq.sigma)
    cols = {}
    for idx, valid in data.eval_batches(len(split.labels), g.eval_batch_size):
        images = sharding.shard_batch(mesh, context.normalize(config, split.images[idx]))
        out = sharding.to_host(fn(gen_state, classifier.state, fills, images))
        for k, v in out.items():
            cols.setdefault(k, []).append(np.asarray(v)[:valid])
    c = {k: jnp.asarray(np.concatenate(v)) for k, v in cols.items()}
    density_B = jnp.mean(c["gates_flat"], axis=-1)
    pairs = c["has_partner"]
    return {
        "num_examples": int(len(split.labels)),
        "agreement": float(metrics.agreement(c["full_logits"], c["pathway_logits"])),
        "density_mean": float(jnp.mean(density_B)),
        "density_std": float(jnp.std(density_B)),
        "mDC": float(metrics.mDC(c["full_logits"], c["pathway_logits"])),
        "mIC": float(metrics.mIC(c["full_logits"], c["pathway_logits"])),
        "leakage": float(
            metrics.leakage(c["partner_logits"], c["classes"], c["partner_classes"], pairs)
        ),
    }
