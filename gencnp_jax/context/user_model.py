"""A user's own classifier: ``config.classifier.factory`` built, its weights loaded from
``config.classifier.checkpoint``, gated at ``config.classifier.sites`` (`attach`).

    c.classifier.factory = "my_package.models:build"   # build(**factory_kwargs) -> model
    c.classifier.checkpoint = "weights.npz"            # .npz / .msgpack / orbax directory
    c.classifier.sites = ("conv*", "block*/act")       # glob patterns over module paths

`build` returns a Flax NNX module, or a Linen ``(module, variables)`` pair. The pipeline
does not train such a model: its `train_classifier` stage imports the weights into the
workdir (so the run keeps the exact weights it explains) and measures them.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from gencnp_jax.io import weights as weights_lib
from gencnp_jax.models import attach as attach_lib
from gencnp_jax.models.gating import GatedClassifier


class UserModelError(ValueError):
    """The user's factory, sites or checkpoint cannot work; the message says which and why."""


def uses_factory(config) -> bool:
    return bool(config.classifier.factory)


def import_factory(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the current directory is importable,
    as for ``python -m``)."""
    where = f"config.classifier.factory={spec!r}"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserModelError(f"{where}: write it as 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own error at import time
        raise UserModelError(
            f"{where}: module {module_name!r} does not import ({type(err).__name__}: {err}); "
            f"it must be importable from the current directory or PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserModelError(f"{where}: module {module_name!r} has no function {attr!r}")
    return fn


def _build(config):
    """``(model, variables)``: an NNX module and None, or a Linen module and its variables."""
    c = config.classifier
    kwargs = c.factory_kwargs
    built = import_factory(c.factory)(
        **(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
    )
    if isinstance(built, nnx.Module):
        return built, None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built
    raise UserModelError(
        f"config.classifier.factory={c.factory!r} returned {type(built).__name__}: return a "
        f"Flax NNX module, or a Linen (module, variables) pair"
    )


def _load_checkpoint(config, model, variables):
    """`model` (NNX, updated in place) or `variables` (Linen) with the checkpoint's weights."""
    path = config.classifier.checkpoint
    if not path:
        return variables
    target = model if variables is None else variables
    loaded = weights_lib.load_weights(target, path, what="classifier checkpoint")
    return None if variables is None else loaded


def build_gated(config, hwc, num_classes: int, load_weights: bool = True) -> GatedClassifier:
    """The user's model, gated at its sites, with the checkpoint's weights (`load_weights`).

    Raises:
      UserModelError: factory, sites or output size wrong; weights_lib.WeightsError: a
        checkpoint that cannot be read or does not fit.
    """
    model, variables = _build(config)
    if load_weights:
        variables = _load_checkpoint(config, model, variables)
    sites = config.classifier.sites
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise UserModelError(
            "config.classifier.sites is empty: name the modules to explain with glob patterns "
            "(gencnp_jax.list_sites(model, x) lists them)"
        )
    example = jnp.zeros((1, *hwc), jnp.float32)
    try:
        gated = attach_lib.attach(model, sites, example, variables=variables)
        logits = jax.eval_shape(lambda s, x: gated.forward(s, x)[0], gated.state, example)
    except (ValueError, TypeError) as err:
        raise UserModelError(f"config.classifier.sites={tuple(sites)}: {err}") from None
    if tuple(logits.shape) != (1, num_classes):
        raise UserModelError(
            f"the model of config.classifier.factory={config.classifier.factory!r} returns "
            f"logits of shape {tuple(logits.shape)} for one image; the dataset has "
            f"{num_classes} classes: expected (1, {num_classes})"
        )
    return gated


def saved_part(state):
    """What the workdir keeps of a gated state: everything but NNX RNG state."""
    if isinstance(state, nnx.State):
        return nnx.split_state(state, nnx.RngState, ...)[1]
    return state


def with_saved(gated: GatedClassifier, saved) -> GatedClassifier:
    """`gated` over `saved` (as `saved_part` gave it) and its own RNG state."""
    if isinstance(gated.state, nnx.State):
        rng, _ = nnx.split_state(gated.state, nnx.RngState, ...)
        return gated.with_state(nnx.merge_state(saved, rng))
    return gated.with_state(saved)


def unwrapped_forward(config, graphdef) -> Callable | None:
    """``fn(state, x) -> logits``: the user's model as the factory builds it, eval mode,
    without `attach` (the bench's reference), over the gated model's state; None for a
    built-in classifier."""
    if not uses_factory(config) or not isinstance(graphdef, GatedClassifier):
        return None
    model, variables = _build(config)
    if variables is not None:  # Linen: the default call of `attach_linen`
        return lambda state, x: model.apply(state, x)
    model.eval()
    plain_graphdef = nnx.graphdef(model)
    call = graphdef.call_model
    return lambda state, x: call(nnx.merge(plain_graphdef, state), x)
