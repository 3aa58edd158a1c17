"""The gating context shared by `attach` (NNX) and `attach_linen`: the gate itself, the
per-forward context that carries gates, fills and recordings, site-pattern matching, and
`GatedClassifier`. Design: docs/ATTACH.md.
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

ACTIVE: contextvars.ContextVar[Context | None] = contextvars.ContextVar("attach_ctx", default=None)


def shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape) if hasattr(a, "shape") else None, tree)


@jax.custom_jvp
def _mix(out, g, fill):
    """``out*g + fill*(1-g)``, exactly ``out`` where g == 1 and ``fill`` where g == 0."""
    return jnp.where(g == 1, out, jnp.where(g == 0, fill, out * g + fill * (1 - g)))


@_mix.defjvp
def _mix_jvp(primals, tangents):
    (out, g, fill), (d_out, d_g, d_fill) = primals, tangents
    y = _mix(out, g, fill)
    return y, jnp.broadcast_to(d_out * g + d_g * (out - fill) + d_fill * (1 - g), y.shape)


def gate(site: str, out: jax.Array, g: jax.Array, fill: jax.Array | None = None) -> jax.Array:
    """Gates ``out`` (B, ..., C) by ``g`` (B, C) (or out's own shape) on its last axis."""
    b, c = out.shape[0], out.shape[-1]
    if tuple(g.shape) == (b, c):
        g = g.reshape((b,) + (1,) * (out.ndim - 2) + (c,))
    elif tuple(g.shape) != tuple(out.shape):
        raise ValueError(
            f"gates[{site!r}] has shape {tuple(g.shape)}, expected ({b}, {c}) = (batch, "
            f"channels on the last axis) for the site's output of shape {tuple(out.shape)}"
        )
    fill = jnp.zeros((), out.dtype) if fill is None else jnp.asarray(fill, out.dtype)
    pairs = zip(fill.shape[::-1], out.shape[::-1], strict=False)
    if fill.ndim > out.ndim or any(f not in (1, o) for f, o in pairs):
        raise ValueError(
            f"fills[{site!r}] has shape {tuple(fill.shape)}, which does not broadcast to the "
            f"site's output shape {tuple(out.shape)} (give f32[{c}])"
        )
    return _mix(out, g.astype(out.dtype), fill)


class Context:
    """What one forward (or one abstract listing pass) knows and records."""

    def __init__(self, gates=None, fills=None, ids=None, record_all=False):
        self.gates, self.fills = dict(gates or {}), dict(fills or {})
        self.ids = ids  # NNX: id(site module of this forward's merged model) -> site
        self.record_all = record_all  # list_sites: record every call, allow repeats
        self.features: dict[str, object] = {}
        self.calls: dict[str, int] = {}

    def enter(self, site: str) -> None:
        self.calls[site] = self.calls.get(site, 0) + 1
        if self.calls[site] > 1 and not self.record_all:
            raise ValueError(
                f"gate site {site!r} was called twice in one forward; a gate site must run "
                "exactly once per input (choose a module that is not reused / shared)"
            )
        self.features.setdefault(site, None)  # keeps call (entry) order

    def exit(self, site: str, out):
        if self.record_all:
            if self.calls[site] == 1:  # shapes only: no tracer leaves a transform's trace
                self.features[site] = shapes(out)
            return out
        if not isinstance(out, jax.Array) or out.ndim < 2:
            what = f"shape {tuple(out.shape)}" if hasattr(out, "shape") else type(out).__name__
            raise ValueError(
                f"gate site {site!r} returns {what}; a gate site must return one array of "
                "shape (batch, ..., channels)"
            )
        self.features[site] = out
        g = self.gates.get(site)
        return out if g is None else gate(site, out, g, self.fills.get(site))


def run_site(site_of_self: str, call: Callable[[], object]):
    if (ctx := ACTIVE.get()) is None:
        return call()
    ctx.enter(site_of_self)
    return ctx.exit(site_of_self, call())


def match(pattern: str, path: str) -> bool:
    """Glob match segment by segment: ``*`` stays within one segment, ``**`` spans any."""

    def rec(ps: list[str], xs: list[str]) -> bool:
        if not ps:
            return not xs
        if ps[0] == "**":
            return any(rec(ps[1:], xs[i:]) for i in range(len(xs) + 1))
        return bool(xs) and fnmatch.fnmatchcase(xs[0], ps[0]) and rec(ps[1:], xs[1:])

    return rec(pattern.strip("/").split("/"), path.split("/"))


def select(patterns, available) -> list[str]:
    """The available paths matched by any pattern; a pattern matching none is an error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    available = list(available)
    for p in patterns:
        if not any(match(p, a) for a in available):
            raise ValueError(
                f"site pattern {p!r} matches no submodule; available: {sorted(available)}"
            )
    return [a for a in available if any(match(p, a) for p in patterns)]


class GatedClassifier:
    """``forward(state, x, gates=None, fills=None) -> (logits, features)`` (features in call
    order; jit sorts dict keys); ``site_channels`` in call order (shallow to deep)."""

    def __init__(
        self,
        graphdef,
        state,
        site_channels: dict[str, int],
        run: Callable,
        call_model: Callable | None = None,
    ):
        self.graphdef, self.state, self.site_channels = graphdef, state, dict(site_channels)
        self._run = run  # (graphdef, state, x, ctx) -> logits, with ctx active
        # NNX: (merged model, x) -> logits outside any context (BatchNorm re-estimation);
        # None for Linen.
        self.call_model = call_model

    def with_state(self, state) -> GatedClassifier:
        """The same gated model over another state (e.g. restored weights)."""
        return GatedClassifier(self.graphdef, state, self.site_channels, self._run, self.call_model)

    def forward(self, state, x, gates: Mapping | None = None, fills: Mapping | None = None):
        for name, given in (("gates", gates), ("fills", fills)):
            unknown = sorted(set(given or {}) - set(self.site_channels))
            if unknown:
                raise ValueError(
                    f"{name} name unknown sites {unknown}; the sites are {list(self.site_channels)}"
                )
        ctx = Context(gates, fills)
        logits = self._run(self.graphdef, state, x, ctx)
        missing = [s for s in self.site_channels if ctx.features.get(s) is None]
        if missing:
            raise ValueError(f"gate sites {missing} were not called during forward")
        return logits, {s: f for s, f in ctx.features.items() if s in self.site_channels}


def probe(graphdef, state, chosen, run, example_input, call_model=None) -> GatedClassifier:
    """Site channels in call order from one abstract forward (which also validates)."""
    probe = GatedClassifier(graphdef, state, dict.fromkeys(chosen, 0), run)
    channels = {}  # filled at trace time, in call order
    jax.eval_shape(
        lambda s, x: channels.update({k: f.shape[-1] for k, f in probe.forward(s, x)[1].items()}),
        state,
        example_input,
    )
    return GatedClassifier(graphdef, state, channels, run, call_model)
