"""The one training loop of both trainers (classifier and generator) and their train state.

`run` steps a jitted, donating train step over deterministic `(seed, step)` batches: it logs
each step's metrics one step late (reading them would otherwise stall the host on the step
just launched), checkpoints periodically, stops on non-finite losses before saving them, and
resumes from the newest checkpoint. Under a pipeline's SIGTERM / SIGINT guard
(`io/preemption.py`) it stops after the current step, saves that step and raises `Preempted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import numpy as np
import optax
from flax import nnx

from gencnp_jax.io import checkpointing, data, preemption, sharding, writers


@flax.struct.dataclass
class TrainState:
    """A model's train state as it crosses jit.

    Attributes:
      params: the `nnx.Param` variables (what the optimizer updates).
      rest: every other variable (BatchNorm statistics...).
      opt_state: the optimizer state of `params`.
    """

    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState

    @classmethod
    def create(
        cls, model: nnx.Module, tx: optax.GradientTransformation
    ) -> tuple[nnx.GraphDef, TrainState]:
        """`(graphdef, state)` of `model` with a fresh optimizer state."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, cls(params, rest, tx.init(params))

    def model_state(self) -> nnx.State:
        """The model's whole state (params and rest), as `nnx.merge` takes it."""
        return nnx.merge_state(self.params, self.rest)


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """A jitted train step with its per-run arguments bound: `bound(state, batch, step)`.

    Attributes:
      jitted: ``jitted(state, batch, *step_args(step)) -> (state, metrics)``, donating `state`.
      step_args: the step's other arguments at global step `step` (keys, hyper-parameters...).
    """

    jitted: Callable[..., tuple[Any, dict]]
    step_args: Callable[[int], tuple]

    def __call__(self, state, batch, step: int) -> tuple[Any, dict]:
        return self.jitted(state, batch, *self.step_args(step))


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How `run` reports and keeps a run.

    Attributes:
      log_every / checkpoint_every: in steps.
      desc: the progress bar's label.
      ckpt_dir: resume from and checkpoint to this folder; None = in memory only.
      writer: where the logged metrics go (None: only checked, never written).
    """

    log_every: int
    checkpoint_every: int
    desc: str
    ckpt_dir: str | None = None
    writer: writers.MetricWriter | None = None


@dataclasses.dataclass
class LoopResult:
    """What `run` leaves: the final (replicated) state, the step it resumed from, its time."""

    state: Any
    start: int
    seconds: float


def batches_at(
    mesh: jax.sharding.Mesh,
    arrays_at: Callable[[np.ndarray], Any],
    num_examples: int,
    batch_size: int,
    seed: int,
) -> Callable[[int], Any]:
    """``step -> sharded batch``: the rows `data.batch_indices(..., seed, step)` picks.

    Args:
      arrays_at: ``indices int64[batch_size] -> host pytree`` of the rows (normalised images...).
    """

    def at(step: int):
        idx = data.batch_indices(num_examples, batch_size, seed, step)
        return jax.tree.map(lambda a: sharding.shard_batch(mesh, a), arrays_at(idx))

    return at


def run(
    bound: BoundStep,
    state,
    batch_at: Callable[[int], Any],
    total: int,
    mesh: jax.sharding.Mesh,
    options: LoopOptions,
) -> LoopResult:
    """Runs steps `start..total-1` of `bound` and saves the last state at `total`.

    Args:
      bound: the train step; it donates `state`.
      state: the fresh host train state (also the restore template).
      batch_at: ``step -> sharded batch``, a function of the step alone (see `batches_at`).
      total: the number of steps of the whole run.
      mesh: the data mesh the state is replicated over.
      options: logging, checkpointing and the progress bar's label.

    Raises:
      FloatingPointError: a logged or checkpointed step's metrics are not finite.
    """
    log_every, checkpoint_every = options.log_every, options.checkpoint_every
    ckpt_dir, writer, desc = options.ckpt_dir, options.writer, options.desc
    ckpt = checkpointing.Checkpointer(ckpt_dir) if ckpt_dir else None
    restored = ckpt.restore(state) if ckpt else None
    start = 0 if restored is None else restored[0]
    if restored is not None:
        state = restored[1]
    state = sharding.replicate(mesh, state)
    # A pipeline training stage's SIGTERM / SIGINT guard: stop after a step, save it, exit.
    guard = preemption.active() if ckpt else None
    if guard is not None:
        guard.where, guard.resume_step = ckpt.directory, None if restored is None else start
    polling = guard.polling() if guard is not None else contextlib.nullcontext()
    bar = writers.progress(total, start, desc)
    t0, pending, metrics = time.time(), None, None
    with polling:
        for step in range(start, total):
            state, metrics = bound(state, batch_at(step), step)
            if pending is not None:  # the previous step's metrics: no host stall on this one
                log_metrics(writer, bar, *pending)
            pending = (step + 1, metrics) if (step + 1) % log_every == 0 else None
            bar.update(1)
            if guard is not None and step + 1 < total and guard.should_stop(step + 1, log_every):
                _stop(guard, ckpt, bar, step + 1, state, metrics, pending, writer)
            if ckpt and (step + 1) % checkpoint_every == 0 and step + 1 < total:
                check_finite(step + 1, metrics)  # never checkpoint a diverged state
                _save(guard, ckpt, step + 1, state)
        if pending is not None:
            log_metrics(writer, bar, *pending)
        elif start < total:
            check_finite(total, metrics)
        bar.close()
        if ckpt:
            _save(guard, ckpt, total, state)
            ckpt.close()
    return LoopResult(state, start, time.time() - t0)


def _save(guard, ckpt, step: int, state) -> None:
    ckpt.save(step, state)
    if guard is not None:
        guard.resume_step = step


def _stop(guard, ckpt, bar, step: int, state, metrics, pending, writer) -> None:
    """Ends a preempted run: logs and checks `step`'s metrics, saves its state, raises."""
    if pending is not None:
        log_metrics(writer, bar, *pending)
    check_finite(step, metrics)  # never checkpoint a diverged state
    _save(guard, ckpt, step, state)
    ckpt.close()
    bar.close()
    raise guard.preempted(step, saved_now=True)


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


def log_metrics(writer, bar, step: int, metrics: dict) -> None:
    """Checks `metrics` (see `check_finite`), writes them and shows the losses on the bar."""
    values = check_finite(step, metrics)
    if writer is not None:
        writer.write(step, values)
    shown = {
        k.split("/")[-1]: f"{v:.3f}" for k, v in values.items() if k.startswith(("loss/", "train/"))
    }
    bar.set_postfix(shown)
