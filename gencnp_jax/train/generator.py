"""Trains the GEN-CNP generator against the frozen classifier (docs/METHOD.md §4).

One jit-compiled sharded step; the classifier state is a non-donated argument that no gradient
reaches. Writes `WORKDIR/generator/{checkpoints,final,metrics.json,...}`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, checkpointing, sharding, timings, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import losses, objective
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models import generator as generator_lib
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import fills as fills_lib
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


def make_train_step(gen_graphdef: nnx.GraphDef, tx, terms: tuple[str, ...]):
    """`step(state, batch, step, classifier, weights, hp) -> (state, metrics)`, jitted.

    `batch` is the images, or a dict of ``images`` and the PIO targets of the ``distill``
    and ``rank`` terms (``target_masks``, ``teacher_logits``, and the targets' images as the
    generator reads them, ``target_pools`` and ``target_fo``: `target_readings`). The step
    reads the images once (`objective.batch_of`). `state` is a
    `train_loop.TrainState` (donated); the `FrozenClassifier` (with its ablation fills) is not
    donated and no gradient
    reaches it. `terms` are the loss terms the step computes (`losses.LossWeights.active`): a
    term left out costs nothing.
    """

    def step(state: train_loop.TrainState, batch, step_idx, classifier, weights, hp):
        targets = dict(batch) if isinstance(batch, dict) else {"images": batch}
        images = targets.pop("images")
        model = nnx.merge(gen_graphdef, state.params, state.rest)
        batch = {**objective.batch_of(model, classifier, images), **targets}
        full_logits = batch["full_logits"]
        if "ranked" in terms:
            batch["ranked_density"] = objective.ranked_densities(len(images), step_idx, hp)
        w = objective.step_weights(weights, step_idx, hp)

        def loss_fn(model):
            computed, gates, pathway_logits, _ = objective.loss_terms(
                model, classifier, batch, hp, terms
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
    config, classifier: FrozenClassifier, model=None, steps=None, train_split=None, mesh=None
) -> tuple[nnx.GraphDef, optax.GradientTransformation, train_loop.TrainState]:
    """`(gen_graphdef, tx, TrainState)`: a fresh generator (or `model`) and fresh Adam state
    for a run of `steps` (default `config.generator.steps`). The channel evidence's
    pooled-feature statistics come from `train_split`."""
    g = config.generator
    if model is None:
        model = loading.new_generator(config, classifier.site_channels, classifier.num_classes)
        if train_split is not None:
            with timings.phase("pool_stats"):
                model.set_pool_stats(pool_stats(config, classifier, train_split, mesh))
    total = g.steps if steps is None else steps
    tx = train_classifier.make_optimizer(
        g.learning_rate, 0.0, g.warmup_steps, total, config.train.grad_clip
    )
    gen_graphdef, state = train_loop.TrainState.create(model, tx)
    return gen_graphdef, tx, state


def bound_step(config, gen_graphdef, classifier: FrozenClassifier, tx, mesh):
    """The train step with the classifier (its fills: the run's ablation) and the loss
    settings bound, replicated over `mesh`."""
    hp, weights = hparams_from_config(config.generator)
    terms = weights.active()
    classifier, hp, weights = sharding.replicate(mesh, (classifier, hp, weights))
    return train_loop.BoundStep(
        make_train_step(gen_graphdef, tx, terms),
        lambda step: (jnp.int32(step), classifier, weights, hp),
    )


@dataclasses.dataclass(frozen=True)
class Fit:
    """What `fit` leaves: the generator's graph definition, the loop's result, the targets."""

    gen_graphdef: nnx.GraphDef
    result: train_loop.LoopResult
    targets: pio_targets.Targets | None

    def generator(self) -> FrozenGenerator:
        return FrozenGenerator(self.gen_graphdef, self.result.state.model_state())


def fit(config, classifier, train_split, mesh, run: RunOptions) -> Fit:
    """Trains a fresh generator for `run.steps` steps against `classifier` (its fills: the
    run's ablation) on batches of `(run.seed, step)`; with `run.out_dir`, resumes from and
    checkpoints to its `checkpoints` folder (and caches the PIO targets in `pio_targets`)."""
    gen_graphdef, tx, state = init_state(config, classifier, None, run.steps, train_split, mesh)
    images_at = lambda idx: inputs.normalize(config, train_split.images[idx])
    batch_at = train_loop.batches_at(
        mesh, images_at, len(train_split.labels), config.train.batch_size, run.seed
    )
    targets = None
    if pio_targets.enabled(config):
        cache = None if run.out_dir is None else os.path.join(run.out_dir, "pio_targets")
        with timings.phase("pio_targets"):
            targets = pio_targets.compute(config, classifier, train_split, mesh, cache)
        with timings.phase("target_readings"):
            model = nnx.merge(gen_graphdef, state.params, state.rest)
            readings = target_readings(config, model, classifier, train_split, targets, mesh)
        target_at = pio_targets.step_batches(config, targets, readings, mesh, run.seed + 1)
        batch_at = lambda step, images_at=batch_at: {"images": images_at(step), **target_at(step)}
    with timings.phase("steps"):
        result = train_loop.run(
            bound_step(config, gen_graphdef, classifier, tx, mesh),
            state,
            batch_at,
            run.steps,
            mesh,
            train_loop.LoopOptions(
                log_every=config.train.log_every,
                checkpoint_every=config.train.checkpoint_every,
                desc="train_generator",
                ckpt_dir=None if run.out_dir is None else os.path.join(run.out_dir, "checkpoints"),
                writer=run.writer,
            ),
        )
    return Fit(gen_graphdef, result, targets)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """One generator training: its length, its batches' seed, and where it keeps its files
    (`out_dir` None: in memory only, nothing written)."""

    steps: int
    seed: int
    out_dir: str | None = None
    writer: writers.MetricWriter | None = None


def fit_generator(config, classifier: FrozenClassifier, train_split, mesh, steps, seed):
    """Trains a fresh generator in memory on any classifier: a `FrozenGenerator`.

    The objective, model and optimizer settings of `train_generator` (the config's ablation
    too: mean ablation fills are recomputed for this classifier), on `steps` batches drawn
    with `seed`; no checkpoint, log or file is written.
    """
    mean = config.generator.ablation == "mean"
    means = _means(config, classifier, train_split, mesh) if mean else None
    run = RunOptions(steps=steps, seed=seed)
    return fit(config, classifier.with_fills(means), train_split, mesh, run).generator()


def target_readings(config, model, classifier: FrozenClassifier, split, targets, mesh) -> dict:
    """``{target_pools, target_fo}``, host arrays with a row per PIO target: its image as the
    generator `model` reads it (`objective.read`). The classifier is frozen, so a target's
    reading never changes: read once here, not at every step that draws it."""
    fn = jax.jit(lambda c, x: objective.read(model, c, x)[1:])
    placed = sharding.replicate(mesh, classifier)
    pools, fo = batched.map_batches(
        lambda x: fn(placed, x),
        lambda idx: inputs.normalize(config, split.images[targets.indices[idx]]),
        len(targets.indices),
        config.train.eval_batch_size,
        mesh,
    )
    return {"target_pools": pools, "target_fo": fo}


def pool_stats(config, classifier: FrozenClassifier, split, mesh) -> dict:
    """``site -> (mean, std)`` of the generator's pooled clean features, ``f32[P * C]`` each,
    over the first ``config.generator.stats_examples`` images of `split`."""
    pooling = tuple(config.generator.model.pooling)
    fn = jax.jit(
        lambda c, x: {s: generator_lib.pool(f, pooling) for s, f in c.classify(x)[1].items()}
    )
    placed = sharding.replicate(mesh, classifier)
    n = min(len(split.labels), config.generator.stats_examples)
    pooled = batched.map_batches(
        lambda x: fn(placed, x),
        lambda idx: inputs.normalize(config, split.images[idx]),
        n,
        config.train.eval_batch_size,
        mesh,
    )
    return {s: (v.mean(0), v.std(0)) for s, v in pooled.items()}


def _means(config, classifier: FrozenClassifier, split, mesh) -> dict:
    norm = lambda x: inputs.normalize(config, x)
    return fills_lib.channel_means(
        classifier, split.images, norm, config.train.eval_batch_size, mesh
    )


def train_generator(config, workdir: str) -> dict:
    """Trains (or resumes) the generator; writes `generator/metrics.json` on the test split."""
    g = config.generator
    classifier = loading.load_classifier(config, workdir)
    out_dir = workdir_lib.generator_dir(workdir)
    train, test = inputs.load_data(config, "train"), inputs.load_data(config, "test")
    mesh = inputs.make_mesh(config)
    sharding.check_batch_size(mesh, config.train.batch_size)
    sharding.check_batch_size(mesh, config.train.eval_batch_size)  # fail now, not after training
    with timings.phase("channel_means"):
        means = _means(config, classifier, train, mesh)
    classifier = classifier.with_fills(means if g.ablation == "mean" else None)
    writer = writers.MetricWriter(out_dir)
    run = RunOptions(steps=g.steps, seed=config.seed + 1, out_dir=out_dir, writer=writer)
    done = fit(config, classifier, train, mesh, run)
    generator = done.generator()
    final = checkpointing.Checkpointer(os.path.join(out_dir, "final"), max_to_keep=1)
    final.save(g.steps, {"generator": generator.state, "means": means})
    final.close()
    with timings.phase("metrics"):
        out = generator_metrics.evaluate_split(config, generator, classifier, test, mesh)
    result = done.result
    out.update(
        train_seconds=result.seconds,
        train_steps=g.steps,
        resumed_from_step=result.start,
        train_steps_per_second=(g.steps - result.start) / max(result.seconds, 1e-9),
    )
    writer.write(g.steps, {f"test/{k}": v for k, v in out.items()})
    writer.close()
    if done.targets is not None:
        out["pio_targets"] = done.targets.summary
    writers.write_json(os.path.join(out_dir, "metrics.json"), out)
    return out
