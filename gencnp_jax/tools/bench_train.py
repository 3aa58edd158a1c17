"""Timing helpers of `--mode=bench`, and its train-step and multi-device measurements.

The train steps timed are the trainers' own (`train_classifier.bound_step`,
`train_generator.bound_step`) on their own train states, started from the trained weights.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax.context import loading
from gencnp_jax.io import sharding
from gencnp_jax.method import explain, objective
from gencnp_jax.models import daq
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
from gencnp_jax.models.gating import GatedClassifier
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator as train_generator
from gencnp_jax.train import loop as train_loop
from gencnp_jax.train import pio_targets


def measure(call: Callable[[], object], repeats: int, jitted=None, warmup: int = 2) -> dict:
    """Times `call()` (blocking on its outputs): `repeats` runs after `warmup` runs.

    The first run includes compilation and is reported apart as `first_call_seconds`. Two
    warm-up runs by default: a train step's second call feeds the first call's outputs back
    in, which would recompile if their shardings differed from the inputs'. With `jitted`,
    `retraces` counts the programs `jitted` compiled after the first call (0: compiled once).
    """
    return measure_interleaved({"call": (call, jitted)}, repeats, warmup)["call"]


def measure_interleaved(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Times several calls, ``name -> (call, jitted or None)``, round-robin: each repeat times
    every call once, so a change of the machine's load falls on all of them alike and their
    ratios hold. Per name: ``min_seconds`` (the best case, robust to load), ``median_seconds``,
    ``seconds`` (every timed call), ``first_call_seconds`` and, with `jitted`, ``retraces``."""
    first, after_first = {}, {}
    for name, (call, jitted) in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        first[name] = time.perf_counter() - t0
        cache_size = getattr(jitted, "_cache_size", None)
        after_first[name] = None if cache_size is None else int(cache_size())
    for _ in range(warmup - 1):
        for call, _ in calls.values():
            jax.block_until_ready(call())
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (call, _) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            seconds[name].append(time.perf_counter() - t0)
    out = {}
    for name, (_, jitted) in calls.items():
        out[name] = {
            "min_seconds": min(seconds[name]),
            "median_seconds": statistics.median(seconds[name]),
            "first_call_seconds": first[name],
            "seconds": seconds[name],
        }
        if after_first[name] is not None:
            out[name]["retraces"] = int(jitted._cache_size()) - after_first[name]
    return out


def per_image(timing: dict, batch: int) -> dict:
    """Throughput from the best (minimum) time: the machine's, not its load's."""
    return {
        **timing,
        "images_per_second": batch / timing["min_seconds"],
        "seconds_per_image": timing["min_seconds"] / batch,
        "median_images_per_second": batch / timing["median_seconds"],
    }


def per_step(timing: dict) -> dict:
    return {
        **timing,
        "steps_per_second": 1.0 / timing["min_seconds"],
        "median_steps_per_second": 1.0 / timing["median_seconds"],
    }


@dataclasses.dataclass
class Models:
    """What every measurement reads: trained classifier (with the run's fills), trained
    generator, DAQ's settings, a real batch."""

    classifier: FrozenClassifier
    generator: FrozenGenerator
    settings: daq.Settings
    images: np.ndarray  # f32[B, H, W, C], normalised
    labels: np.ndarray  # i32[B]


@dataclasses.dataclass
class TrainStates:
    """Both trainers' `(graphdef, tx, host train state)`, from the trained weights."""

    classifier: tuple
    generator: tuple


class RepeatedStep:
    """Calls a donating bound train step on one batch, feeding its new state back in."""

    def __init__(self, bound: train_loop.BoundStep, state, batch):
        self.bound, self.state, self.batch, self.count = bound, state, batch, 0

    def __call__(self):
        self.state, metrics = self.bound(self.state, self.batch, self.count)
        self.count += 1
        return self.state, metrics


def _host_copy(tree):
    """An owning numpy copy: each mesh gets fresh buffers that its donating step may consume."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def train_states(models: Models, config) -> TrainStates:
    """The trainers' own train states (fresh optimizer state) around the trained weights."""
    cls_train = None  # a user's attached model is imported, never trained: nothing to time
    if not isinstance(models.classifier.graphdef, GatedClassifier):
        cls_model = nnx.merge(models.classifier.graphdef, models.classifier.state)
        cls_gd, cls_tx, cls_state = train_classifier.init_state(config, cls_model, 10_000)
        cls_train = (cls_gd, cls_tx, _host_copy(cls_state))
    gen_model = nnx.merge(models.generator.graphdef, models.generator.state)
    steps = max(config.generator.steps, 2)
    gen_gd, gen_tx, gen_state = train_generator.init_state(
        config, models.classifier, gen_model, steps
    )
    return TrainStates(cls_train, (gen_gd, gen_tx, _host_copy(gen_state)))


def train(models: Models, config, mesh, repeats: int, states: TrainStates) -> dict:
    """Train steps/s of the classifier (built-in ones only) and of the generator on `mesh`."""
    gen_gd, gen_tx, gen_host = states.generator
    images, labels = sharding.shard_batch(mesh, models.images, models.labels)
    out = {}
    if states.classifier is not None:
        cls_gd, cls_tx, cls_host = states.classifier
        cls_bound = train_classifier.bound_step(cls_gd, cls_tx)
        cls_state = sharding.replicate(mesh, _host_copy(cls_host))
        cls_loop = RepeatedStep(cls_bound, cls_state, {"images": images, "labels": labels})
        out["classifier"] = per_step(measure(cls_loop, repeats, cls_bound.jitted))
    gen_bound = train_generator.bound_step(config, gen_gd, models.classifier, gen_tx, mesh)
    gen_batch = images
    if pio_targets.enabled(config):  # the step's target terms too, on random targets
        n, count = sum(models.classifier.site_channels.values()), config.generator.pio.per_step
        rows = np.arange(count) % len(models.images)
        rng = np.random.default_rng(0)
        gen_model = nnx.merge(gen_gd, gen_host.model_state())
        read = objective.read(gen_model, models.classifier, jnp.asarray(models.images[rows]))
        pools, fo = jax.tree.map(np.asarray, read[1:])
        targets = {
            "target_masks": rng.integers(0, 2, (count, n)).astype(np.float32),
            "target_pools": pools,
            "target_fo": fo,
        }
        if loading.has_rank_head(config):
            targets["teacher_logits"] = rng.normal(size=(count, n)).astype(np.float32)
        gen_batch = {
            "images": images,
            **jax.tree.map(lambda a: sharding.shard_batch(mesh, a), targets),
        }
    gen_loop = RepeatedStep(gen_bound, sharding.replicate(mesh, _host_copy(gen_host)), gen_batch)
    out["generator"] = per_step(measure(gen_loop, repeats, gen_bound.jitted))
    return out


def gencnp_on(models: Models, config, mesh, repeats: int) -> dict:
    """GEN-CNP images/s on `mesh` (`explain.jit_explain`)."""
    del config
    fn = explain.jit_explain
    generator, classifier = sharding.replicate(mesh, (models.generator, models.classifier))
    images = sharding.shard_batch(mesh, models.images)
    call = lambda: fn(generator, classifier, images, models.settings)
    return per_image(measure(call, repeats, fn), models.images.shape[0])


@dataclasses.dataclass(frozen=True)
class Headline:
    """The measurements already made on the main mesh (reused by `scaling` for its size)."""

    mesh: jax.sharding.Mesh
    train: dict
    gencnp: dict


def scaling(models, config, headline: Headline, repeats, states, notes) -> dict:
    """Steps/s of both train steps and GEN-CNP images/s on meshes over the first n devices."""
    out = {}
    main_mesh, main_train, main_gencnp = headline.mesh, headline.train, headline.gencnp
    available, batch = jax.device_count(), models.images.shape[0]
    for n in sorted({1, jax.device_count()}):
        n = int(n)
        reason = None
        if n > available:
            reason = f"only {available} device(s) visible"
        elif batch % n:
            reason = f"batch size {batch} does not split over {n} devices"
        elif jax.process_count() > 1 and n != available:
            reason = "multi-host run: only the mesh over all devices is measured"
        if reason:
            out[str(n)] = {"skipped": reason}
            notes.append(f"device count {n} skipped: {reason}")
            continue
        if n == main_mesh.size:
            steps, gencnp = main_train, main_gencnp
        else:
            mesh = sharding.make_mesh(n)
            steps = train(models, config, mesh, repeats, states)
            gencnp = gencnp_on(models, config, mesh, repeats)
        out[str(n)] = {
            "classifier_steps_per_second": steps.get("classifier", {}).get(
                "steps_per_second", float("nan")
            ),
            "generator_steps_per_second": steps["generator"]["steps_per_second"],
            "gencnp_images_per_second": gencnp["images_per_second"],
        }
    return out
