"""Trains the GEN-CNP generator against the frozen classifier (docs/METHOD.md §4).

One jit-compiled sharded step; the classifier state is a non-donated argument that no gradient
reaches. Writes `WORKDIR/generator/{checkpoints,final,metrics.json,...}`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, checkpointing, sharding
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.io import writers as logging_utils
from gencnp_jax.method import explain, losses, objective
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models import generator as generator_lib
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator_metrics, pio_targets
from gencnp_jax.train import loop as train_loop


def hparams_from_config(g) -> tuple[objective.StepHParams, losses.LossWeights]:
    """The step's numbers and loss weights from the `config.generator` section `g`."""
    d, loss = g.daq, g.loss
    f = lambda v: jnp.asarray(v, jnp.float32)
    hp = objective.StepHParams(
        temperature=f(d.temperature),
        sigma=f(d.sigma),
        tau=f(loss.tau),
        hinge_margin=f(loss.hinge_margin),
        leak_margin=f(loss.leak_margin),
        ramp_steps=f(loss.sparsity_ramp_steps),
        ranked_low=f(loss.ranked_density[0]),
        ranked_high=f(loss.ranked_density[1]),
    )
    return hp, losses.LossWeights.create(**{n: loss[f"w_{n}"] for n in losses.TERMS})


def make_train_step(gen_graphdef: nnx.GraphDef, cls_graphdef: nnx.GraphDef, tx, terms):
    """`step(state, batch, step, cls_state, fills, weights, hp) -> (state, metrics)`.

    `batch` is the images, or a dict of ``images`` and the PIO targets of the ``distill``
    term (``target_images``, ``target_masks``). `state` is a `train_loop.TrainState`
    (donated); the classifier state is not donated and no gradient reaches it. `terms` are the
    loss terms the step computes (`losses.LossWeights.active`): a term left out costs nothing.
    """

    def step(state: train_loop.TrainState, batch, step_idx, cls_state, fills, weights, hp):
        targets = dict(batch) if isinstance(batch, dict) else {"images": batch}
        images = targets.pop("images")
        full_logits = classifiers.forward(cls_graphdef, cls_state, images)[0]
        pred = jnp.argmax(full_logits, -1)
        batch = {"images": images, "full_logits": full_logits, "pred": pred, **targets}
        batch["partner"], batch["has_partner"] = losses.partner_indices(pred)
        if any(t in terms for t in objective.RANKED_TERMS):
            batch["ranked_density"] = objective.ranked_densities(len(images), step_idx, hp)
        w = objective.step_weights(weights, step_idx, hp)
        model = nnx.merge(gen_graphdef, state.params, state.rest)
        classify = lambda x, g=None: classifiers.forward(cls_graphdef, cls_state, x, g, fills)

        def loss_fn(model):
            computed, gates, pathway_logits, _ = objective.loss_terms(
                model, classify, batch, hp, terms
            )
            loss, aux = losses.total_loss(computed, w)
            return loss, (aux, gates, pathway_logits)

        (_, (aux, gates, pathway_logits)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_state = train_loop.TrainState(
            optax.apply_updates(params, updates), state.rest, opt_state
        )
        density_B = gates_lib.density(gates)
        out = {
            **aux,
            "train/density": jnp.mean(density_B),
            "train/density_std": jnp.std(density_B),
            "train/agreement": metrics.agreement(full_logits, pathway_logits),
            **{f"gates/{s}/density": jnp.mean(d) for s, d in gates_lib.site_density(gates).items()},
        }
        return new_state, out

    return jax.jit(step, donate_argnums=0)


def init_state(
    config, classifier, model=None, steps=None, train_split=None, mesh=None
) -> tuple[nnx.GraphDef, optax.GradientTransformation, train_loop.TrainState]:
    """`(gen_graphdef, tx, TrainState)`: a fresh generator (or `model`) and fresh Adam state
    for a run of `steps` (default `config.generator.steps`). The channel evidence's
    pooled-feature statistics come from `train_split`."""
    g = config.generator
    if model is None:
        model = loading.new_generator(config, classifier.site_channels, classifier.num_classes)
        if train_split is not None:
            model.set_pool_stats(pool_stats(config, classifier, train_split, mesh))
    o, total = g.opt, g.steps if steps is None else steps
    tx = train_classifier.make_optimizer(o.learning_rate, 0.0, o.warmup_steps, total, o.grad_clip)
    gen_graphdef, state = train_loop.TrainState.create(model, tx)
    return gen_graphdef, tx, state


def bound_step(config, gen_graphdef, classifier: loading.Classifier, tx, fills, mesh):
    """The train step with the classifier, fills and loss settings bound (replicated)."""
    hp, weights = hparams_from_config(config.generator)
    terms = weights.active()
    cls_state, fills, hp, weights = sharding.replicate(mesh, (classifier.state, fills, hp, weights))
    return train_loop.BoundStep(
        make_train_step(gen_graphdef, classifier.graphdef, tx, terms),
        lambda step: (jnp.int32(step), cls_state, fills, weights, hp),
    )


def _fit(config, classifier, train_split, mesh, steps, seed, fills, out_dir=None, writer=None):
    """Trains a fresh generator for `steps` steps on batches of `(seed, step)`; with
    `out_dir`, resumes from and checkpoints to its `checkpoints` folder (and caches the PIO
    targets in its `pio_targets` folder). Returns `(gen_graphdef, loop result, targets)`."""
    g = config.generator
    gen_graphdef, tx, state = init_state(config, classifier, None, steps, train_split, mesh)
    images_at = lambda idx: inputs.normalize(config, train_split.images[idx])
    batch_at = train_loop.batches_at(mesh, images_at, len(train_split.labels), g.batch_size, seed)
    targets = None
    if pio_targets.enabled(config):
        cache = None if out_dir is None else os.path.join(out_dir, "pio_targets")
        targets = pio_targets.compute(config, classifier, train_split, fills, mesh, cache)
        target_at = pio_targets.step_batches(config, targets, train_split, mesh, seed + 1)
        batch_at = lambda step, images_at=batch_at: {"images": images_at(step), **target_at(step)}
    result = train_loop.run(
        bound_step(config, gen_graphdef, classifier, tx, fills, mesh),
        state,
        batch_at,
        steps,
        mesh,
        log_every=g.log_every,
        checkpoint_every=g.checkpoint_every,
        desc="train_generator",
        ckpt_dir=None if out_dir is None else os.path.join(out_dir, "checkpoints"),
        writer=writer,
    )
    return gen_graphdef, result, targets


def fit_generator(config, classifier: loading.Classifier, train_split, mesh, steps: int, seed: int):
    """Trains a fresh generator in memory on any classifier: `(gen_graphdef, gen_state)`.

    The objective, model and optimizer settings of `train_generator` (the config's ablation
    too), on `steps` batches drawn with `seed`; no checkpoint, log or file is written.
    """
    fills = _means(config, classifier, train_split) if config.generator.ablation == "mean" else None
    gen_graphdef, result, _ = _fit(config, classifier, train_split, mesh, steps, seed, fills)
    return gen_graphdef, result.state.model_state()


def pool_stats(config, classifier: loading.Classifier, split, mesh) -> dict:
    """``site -> (mean, std)`` of the generator's pooled clean features, ``f32[P * C]`` each,
    over the first ``config.generator.stats_examples`` images of `split`."""
    pooling = tuple(config.generator.model.pooling)
    fn = jax.jit(
        lambda cls_state, x: {
            s: generator_lib.pool(f, pooling)
            for s, f in classifiers.forward(classifier.graphdef, cls_state, x)[1].items()
        }
    )
    cls_state = sharding.replicate(mesh, classifier.state)
    n = min(len(split.labels), config.generator.stats_examples)
    pooled = batched.map_batches(
        lambda x: fn(cls_state, x),
        lambda idx: inputs.normalize(config, split.images[idx]),
        n,
        config.generator.eval_batch_size,
        mesh,
    )
    return {s: (v.mean(0), v.std(0)) for s, v in pooled.items()}


def _means(config, classifier: loading.Classifier, split) -> dict:
    norm = lambda x: inputs.normalize(config, x)
    return explain.channel_means(classifier.graphdef, classifier.state, split.images, norm)


def train_generator(config, workdir: str) -> dict:
    """Trains (or resumes) the generator; writes `generator/metrics.json` on the test split."""
    g = config.generator
    classifier = loading.load_classifier(config, workdir)
    out_dir = workdir_lib.generator_dir(workdir)
    train, test = inputs.load_data(config, "train"), inputs.load_data(config, "test")
    mesh = inputs.make_mesh(config)
    sharding.check_batch_size(mesh, g.batch_size)
    sharding.check_batch_size(mesh, g.eval_batch_size)  # fail now, not after training
    means = _means(config, classifier, train)
    fills = means if g.ablation == "mean" else None
    writer = logging_utils.MetricWriter(out_dir)
    gen_graphdef, result, targets = _fit(
        config, classifier, train, mesh, g.steps, config.seed + 1, fills, out_dir, writer
    )
    gen_state = result.state.model_state()
    final = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final.save(g.steps, {"generator": gen_state, "means": means})
    final.close()
    out = generator_metrics.evaluate_split(
        config, classifier, gen_graphdef, gen_state, fills, test, mesh
    )
    out.update(
        train_seconds=result.seconds,
        train_steps=g.steps,
        resumed_from_step=result.start,
        train_steps_per_second=(g.steps - result.start) / max(result.seconds, 1e-9),
    )
    writer.write(g.steps, {f"test/{k}": v for k, v in out.items()})
    writer.close()
    if targets is not None:
        out["pio_targets"] = targets.summary
    logging_utils.write_json(os.path.join(out_dir, "metrics.json"), out)
    return out
