"""Gate sites on a Linen model (a module plus its variables), via `nn.intercept_methods`.

A site is a submodule whose ``'/'.join(module.path)`` matches a pattern; the interceptor
runs its ``__call__``, records the output and gates it, with the same `Context` as NNX.
Sites inside lifted transforms (nn.scan / nn.vmap) are not supported (see docs/ATTACH.md).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from gencnp_jax.models import gating as core


def _default_call(module, variables, x):
    return module.apply(variables, x)


def _runner(call: Callable, sites: frozenset[str] | None) -> Callable:
    """`run(module, variables, x, ctx)` with an interceptor over ``sites`` (None: all)."""

    def run(module, variables, x, ctx: core.Context):
        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or mod.scope is None or not mod.path:
                return next_fun(*args, **kwargs)
            path = "/".join(str(k) for k in mod.path)
            if sites is not None and path not in sites:
                return next_fun(*args, **kwargs)
            ctx.enter(path)
            return ctx.exit(path, next_fun(*args, **kwargs))

        with nn.intercept_methods(interceptor):
            return call(module, variables, x)

    return run


def list_sites(module, variables, example_input, call=None) -> dict[str, object]:
    """Every submodule path called by one abstract pass -> its output shape, call order."""
    if variables is None or example_input is None:
        raise ValueError("a Linen model needs variables= and example_input to list its sites")
    ctx = core.Context(record_all=True)
    run = _runner(call or _default_call, None)
    jax.eval_shape(lambda v, x: run(module, v, x, ctx), variables, example_input)
    return dict(ctx.features)


def attach(module, variables, sites, example_input, call=None) -> core.GatedClassifier:
    """`attach.attach` for Linen: ``graphdef`` is the module, ``state`` its variables."""
    available = list(list_sites(module, variables, example_input, call))
    chosen = core.select(sites, available)
    run = _runner(call or _default_call, frozenset(chosen))
    return core.probe(module, variables, chosen, run, example_input)
