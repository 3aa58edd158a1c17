"""BatchNorm statistics re-estimated exactly over a split, in inference mode, every gate open.

The running averages of training lag the moving weights; the classifier that is explained
(and the weight-randomised one of the sanity check) gets the population statistics instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gencnp_jax.io import batched, sharding
from gencnp_jax.models import classifiers
from gencnp_jax.models.gating import GatedClassifier


class _Probe(nnx.Module):
    """Stands in for a BatchNorm: records its input, then normalises in inference mode."""

    def __init__(self, bn: nnx.BatchNorm, record):
        self.bn, self.record = bn, record

    def __call__(self, x, use_running_average=None, **kwargs):
        self.record(x)
        return self.bn(x, use_running_average=True, **kwargs)


def _batchnorm_paths(model: nnx.Module) -> list[tuple]:
    return [path for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def _nnx_model(graphdef) -> tuple[nnx.GraphDef, object] | None:
    """``(NNX graphdef, call(model, x))`` of a built-in or attached NNX classifier (None for
    an attached Linen model, whose BatchNorms are not NNX modules)."""
    if isinstance(graphdef, GatedClassifier):
        if graphdef.call_model is None:
            return None
        return graphdef.graphdef, graphdef.call_model
    return graphdef, lambda model, x: model(x, train=False)


def _probed_moments(graphdef, state: nnx.State, images_BxHxWxC, order=None):
    """Per-example mean and variance (over every axis but batch and channel) of each
    BatchNorm's input in inference mode: ``[{"mean": f32[B, C], "var": f32[B, C]}]`` in call
    order; the BatchNorms' module paths are appended to `order` (a list) when given."""
    nnx_graphdef, call = _nnx_model(graphdef)
    model = nnx.merge(nnx_graphdef, state)
    seen = []
    for path in _batchnorm_paths(model):
        parent, key = _module_at(model, path[:-1]), path[-1]
        probe = _Probe(_child(parent, key), lambda x, p=path: seen.append((p, x)))
        if isinstance(key, int):
            parent[key] = probe
        else:
            setattr(parent, key, probe)
    call(model, images_BxHxWxC)
    if order is not None:
        order.extend(p for p, _ in seen)
    axes = lambda x: tuple(range(1, x.ndim - 1))
    return [{"mean": x.mean(axes(x)), "var": x.var(axes(x))} for _, x in seen]


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
    for key in path:
        model = _child(model, key)
    return model


def reestimate_batchnorm(
    graphdef: classifiers.Definition,
    state: nnx.State,
    make_batch,
    num_examples: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> nnx.State:
    """`state` with every BatchNorm's running mean and variance set to the exact population
    statistics of its input over examples ``0..num_examples-1``, in inference mode.

    The BatchNorms are re-estimated one at a time in call order, each after those before it
    (its input depends on their statistics), so afterwards each one's input, with the model
    in inference mode and every gate open, has exactly its running mean and (biased)
    variance. Per example: the mean and variance over its positions (`batched.map_batches`,
    padded rows dropped); the population variance is the mean of those variances plus the
    variance of those means (every example has the same number of positions).

    Args:
      make_batch: ``indices int64[n] -> f32[n, H, W, C]`` normalised images of those rows.
      batch_size: rows per pass; a multiple of the mesh size.

    Returns:
      The new state (the input is not changed); non-BatchNorm variables are kept. An
      attached Linen model's state is returned as it is.
    """
    if _nnx_model(graphdef) is None:  # attached Linen model: its statistics are kept
        return state
    order = []
    example = jnp.asarray(make_batch(np.zeros(1, np.int64)))
    jax.eval_shape(lambda s, x: _probed_moments(graphdef, s, x, order), state, example)
    for layer, path in enumerate(order):
        # One program per BatchNorm, returning only its moments: XLA drops every layer after
        # it, so the passes cost the network's prefixes, not len(order) whole forwards.
        probe = jax.jit(lambda s, x, i=layer: _probed_moments(graphdef, s, x)[i])
        state_dev = sharding.replicate(mesh, state)
        run = lambda x, s=state_dev, probe=probe: probe(s, x)
        moments = batched.map_batches(run, make_batch, num_examples, batch_size, mesh)
        mean_BxC = moments["mean"].astype(np.float64)  # exact sums over the whole split
        var_C = moments["var"].astype(np.float64).mean(0) + mean_BxC.var(0)
        model = nnx.merge(_nnx_model(graphdef)[0], state, copy=True)  # caller's state kept
        bn = _module_at(model, path)
        bn.mean.set_value(jnp.asarray(mean_BxC.mean(0), bn.mean.get_value().dtype))
        bn.var.set_value(jnp.asarray(var_C, bn.var.get_value().dtype))
        state = nnx.state(model)
    return state
