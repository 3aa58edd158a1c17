"""A user's model weights on disk: `.npz`, flax msgpack or an orbax directory, one flat form.

Every format is read into ``{"a/b/kernel": array}``: the '/'-joined path of each leaf of the
model's *pure* state (NNX: ``nnx.state(model).to_pure_dict()`` without RNG state; Linen: the
variables dict, e.g. ``params/Conv_0/kernel``). `fit` places such a dict into a template of
the same form and names what does not fit.

    save_weights(model, "weights.npz")          # an NNX module, or a Linen variables dict
    load_weights(model, "weights.npz")          # NNX: filled in place (and returned)
    variables = load_weights(variables, "weights.msgpack")   # Linen: the filled variables
    flat = read_weights("weights.npz")          # the flat form; also orbax directories
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx, serialization

FORMATS = ".npz (np.savez), .msgpack (flax.serialization.to_bytes) or an orbax directory"


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message says which and why."""


def pure_tree(model_or_tree) -> dict:
    """The pure nested dict of an NNX module's state (RNG state left out), or `tree` itself."""
    if isinstance(model_or_tree, nnx.Module):
        state = nnx.state(model_or_tree, nnx.Not(nnx.RngState))
        return state.to_pure_dict()
    if isinstance(model_or_tree, nnx.State):
        return model_or_tree.to_pure_dict()
    return dict(model_or_tree)


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
    """``{"a/b/c": leaf}`` of a nested mapping (integer keys become their digits)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[key] = leaf
    return flat


def save_weights(model_or_tree, path: str) -> str:
    """Writes an NNX module's state (or a Linen variables dict) to `path` (.npz / .msgpack)."""
    tree = jax.device_get(pure_tree(model_or_tree))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".msgpack"):
        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(tree))
    elif path.endswith(".npz"):
        np.savez(path, **{k: np.asarray(v) for k, v in flatten(tree).items()})
    else:
        raise WeightsError(f"weights path {path!r}: end it with .npz or .msgpack")
    return path


def load_weights(model_or_variables, path: str, *, what: str = "weights"):
    """Puts the weights saved at `path` into a model: the mirror of `save_weights`.

    Args:
      model_or_variables: an NNX module, filled in place (its RNG state untouched); or a Linen
        variables dict (e.g. ``module.init(...)``), the template of the result.
      path: .npz, .msgpack (as `save_weights` writes them) or an orbax checkpoint directory.
      what: how error messages name the file.

    Returns:
      The NNX module itself, or (Linen) new variables of the template's structure and dtypes.

    Raises:
      WeightsError: one line naming the mismatch (keys missing or unexpected, a shape that
        differs) or why the file cannot be read.
    """
    if isinstance(model_or_variables, nnx.Module):
        flat = read_weights(path, what=what)
        state = nnx.state(model_or_variables, nnx.Not(nnx.RngState))
        state.replace_by_pure_dict(fit(flat, state.to_pure_dict(), path, what=what))
        nnx.update(model_or_variables, state)
        return model_or_variables
    if isinstance(model_or_variables, Mapping):
        return fit(read_weights(path, what=what), model_or_variables, path, what=what)
    raise TypeError(
        f"load_weights takes an NNX module or a Linen variables dict, got "
        f"{type(model_or_variables).__name__}"
    )


def read_weights(path: str, *, what: str = "classifier checkpoint") -> dict[str, np.ndarray]:
    """Reads `path` (.npz, .msgpack or an orbax checkpoint directory) into its flat form.

    Raises:
      WeightsError: missing path, unknown format or unreadable file (messages name the file
        as `what`).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise WeightsError(f"{what} {path} does not exist (give {FORMATS})")
    try:
        if os.path.isdir(path):
            return flatten(_read_orbax(path))
        if path.endswith(".npz"):
            if not zipfile.is_zipfile(path):
                raise WeightsError(f"{what} {path} is not an .npz (zip) file")
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.endswith(".msgpack"):
            with open(path, "rb") as f:
                return flatten(serialization.msgpack_restore(f.read()))
    except WeightsError:
        raise
    except Exception as err:  # a damaged or foreign file: one line, not a traceback
        raise WeightsError(
            f"{what} {path} cannot be read ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]})"
        ) from None
    raise WeightsError(f"{what} {path}: unknown format; give {FORMATS}")


def _read_orbax(path: str) -> dict:
    """An orbax PyTree checkpoint: the item directory itself, or the newest numbered step of
    a CheckpointManager directory (its only item, or the one named `state` / `default`)."""
    import orbax.checkpoint as ocp

    steps = sorted((int(n) for n in os.listdir(path) if n.isdigit()), reverse=True)
    if steps:
        step_dir = os.path.join(path, str(steps[0]))
        items = [n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n))]
        named = [n for n in ("state", "default") if n in items]
        if not named and len(items) != 1:
            raise WeightsError(
                f"classifier checkpoint {step_dir} holds items {sorted(items)}: point "
                f"config.classifier.checkpoint at the one with the model's weights"
            )
        path = os.path.join(step_dir, (named or items)[0])
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path)


def fit(
    flat: Mapping[str, np.ndarray],
    template: Mapping,
    source: str,
    *,
    what: str = "classifier checkpoint",
) -> dict:
    """`template` (a pure nested dict) with every leaf replaced by `flat`'s, cast to its dtype.

    Raises:
      WeightsError: keys missing or extra (the first few named), or a shape that differs.
    """
    want = flatten(template)
    missing = [k for k in want if k not in flat]
    extra = [k for k in flat if k not in want]
    if missing or extra:
        raise WeightsError(
            f"{what} {source} does not fit the model: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
            f"{' ...' if len(extra) > 4 else ''} (the model's weights are {list(want)[:4]} ...)"
        )
    for key, leaf in want.items():
        if tuple(np.shape(flat[key])) != tuple(np.shape(leaf)):
            raise WeightsError(
                f"{what} {source}: {key!r} has shape "
                f"{tuple(np.shape(flat[key]))}, the model's is {tuple(np.shape(leaf))}"
            )
    leaves, treedef = jax.tree_util.tree_flatten(dict(template))
    values = [np.asarray(flat[k]).astype(x.dtype) for k, x in zip(want, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, values)
