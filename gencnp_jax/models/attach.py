"""Gate sites on any Flax model: `attach(model, sites)` -> a `GatedClassifier`.

Each submodule whose '/'-joined path matches a glob pattern becomes a gate site: its output
is recorded (``features[site]``) and gated channel-wise on its LAST axis. NNX: the site's
class is swapped for a cached subclass whose ``__call__`` consults the forward context (the
state tree stays the model's own); a plain function attribute gets a static wrapper. Linen:
`attach_linen`. Gates, fills and recordings live in a context set and reset inside one
`forward`, so ``forward(state, x, gates, fills)`` is pure. Design: docs/ATTACH.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import linen as nn
from flax import nnx

from gencnp_jax.models import attach_linen
from gencnp_jax.models.gating import (
    ACTIVE,
    Context,
    GatedClassifier,
    probe,
    run_site,
    select,
)

_GATED_TYPES: dict[type, type] = {}


def _gated_type(cls: type) -> type:
    """A cached subclass of `cls` whose __call__ is a gate site (same state layout)."""
    if cls not in _GATED_TYPES:

        def __call__(self, *args, **kwargs):
            ctx = ACTIVE.get()
            if ctx is not None and ctx.ids is not None and id(self) not in ctx.ids:
                raise ValueError(
                    f"gate site {self._attach_site!r} runs inside an NNX transform of the model "
                    "(nnx.scan / nnx.vmap-stacked layers, nnx.remat, nnx.jit...); gate sites "
                    "must be called directly by their parent: choose a site outside it"
                )
            return run_site(self._attach_site, lambda: cls.__call__(self, *args, **kwargs))

        ns = {"__call__": __call__, "__module__": cls.__module__, "_attach_base": cls}
        _GATED_TYPES[cls] = type(f"Gated{cls.__name__}", (cls,), ns)
    return _GATED_TYPES[cls]


@dataclasses.dataclass(frozen=True)
class _GatedFn:
    """Static stand-in for a plain function stored on a module (e.g. ``self.act = relu``)."""

    fn: Callable
    site: str

    def __call__(self, *args, **kwargs):
        return run_site(self.site, lambda: self.fn(*args, **kwargs))


def _candidates(model: nnx.Module) -> dict[str, tuple]:
    """Every callable submodule, or plain function on a user module / nnx.List: path ->
    (parent, key, node)."""
    nodes = {p: v for p, v in nnx.graph.iter_graph(model)}
    out = {}
    for path, v in nodes.items():
        if not path or any(str(k).startswith("_") for k in path):
            continue
        parent = nodes[path[:-1]]
        if isinstance(v, nnx.Module):
            if callable(v):
                out["/".join(map(str, path))] = (parent, path[-1], v)
        elif callable(v) and not isinstance(v, type | nnx.Variable | jax.Array):
            user = not type(parent).__module__.startswith("flax.")
            if user or isinstance(parent, nnx.List):
                out["/".join(map(str, path))] = (parent, path[-1], v)
    return out


def _wrap(model: nnx.Module, paths) -> nnx.Module:
    """A fresh copy of `model` (same arrays) in eval mode with `paths` turned into sites."""
    work = nnx.merge(*nnx.split(model))
    work.eval()
    cands = _candidates(work)
    for path in paths:
        parent, key, node = cands[path]
        if isinstance(node, nnx.Module):
            node.__class__ = _gated_type(getattr(type(node), "_attach_base", type(node)))
            node._attach_site = path
        elif isinstance(key, int):
            parent[key] = _GatedFn(node, path)
        else:
            setattr(parent, key, _GatedFn(node, path))
    return work


def _nnx_runner(call: Callable | None) -> Callable:
    def run(graphdef, state, x, ctx: Context):
        model = nnx.merge(graphdef, state)
        if not ctx.record_all:
            sites = ((m, getattr(m, "_attach_site", None)) for _, m in nnx.iter_modules(model))
            ctx.ids = {id(m): s for m, s in sites if s is not None}
        token = ACTIVE.set(ctx)
        try:
            return model(x) if call is None else call(model, x)
        finally:
            ACTIVE.reset(token)

    return run


def _is_linen(model) -> bool:
    return isinstance(model, nn.Module)


def list_sites(model, example_input=None, *, variables=None, call=None) -> dict[str, object]:
    """Every candidate site path -> its output shape (call order; None when not called or
    no `example_input`). Linen models need `variables` and `example_input`."""
    if _is_linen(model):
        return attach_linen.list_sites(model, variables, example_input, call)
    paths = list(_candidates(model))
    if example_input is None:
        return dict.fromkeys(paths)
    graphdef, state = nnx.split(_wrap(model, paths))
    ctx = Context(record_all=True)
    run = _nnx_runner(call)
    jax.eval_shape(lambda s, x: run(graphdef, s, x, ctx), state, example_input)
    return {**ctx.features, **{p: None for p in paths if p not in ctx.features}}


def _channels_from_attrs(path: str, node) -> int:
    found = [getattr(node, a, None) for a in ("out_features", "num_features", "features")]
    if not any(isinstance(c, int) for c in found):
        raise ValueError(f"cannot tell the channel count of site {path!r}: pass example_input")
    return next(c for c in found if isinstance(c, int))


def attach(model, sites, example_input=None, *, variables=None, call=None) -> GatedClassifier:
    """Makes the submodules matching `sites` (glob patterns) gate sites of `model`.

    `call(model, x) -> logits` (NNX; default ``model(x)``) or
    `call(module, variables, x)` (Linen; default ``module.apply(variables, x)``) says how to
    run the model in eval mode. With `example_input`, `site_channels` follows call order and
    every site is checked once (called once, returns an array); without it, graph order.
    """
    if _is_linen(model):
        return attach_linen.attach(model, variables, sites, example_input, call)
    cands = _candidates(model)
    chosen = select(sites, list(cands))
    graphdef, state = nnx.split(_wrap(model, chosen))
    run = _nnx_runner(call)
    call_model = (lambda m, x: m(x)) if call is None else call
    if example_input is None:
        channels = {p: _channels_from_attrs(p, cands[p][2]) for p in chosen}
        return GatedClassifier(graphdef, state, channels, run, call_model)
    return probe(graphdef, state, chosen, run, example_input, call_model)
