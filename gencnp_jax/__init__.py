"""gencnp_jax: which neurons a vision model uses for a decision (GEN-CNP neural pathways).

The public API, imported on first use (importing the package stays cheap)::

    from gencnp_jax import attach, list_sites, explain, Explainer, Pathway
    gated = attach(model, ["block*/conv*"], example_input=x)   # any Flax NNX or Linen model
    logits, features = gated.forward(gated.state, x, gates)     # pure, jit-able
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "attach": "gencnp_jax.models.attach",
    "list_sites": "gencnp_jax.models.attach",
    "GatedClassifier": "gencnp_jax.models.gating",
    "Pathway": "gencnp_jax.method.pathway",
    "ClassBank": "gencnp_jax.method.class_bank",
    "explain": "gencnp_jax.method.explain",
    "jit_explain": "gencnp_jax.method.explain",
    "Explainer": "gencnp_jax.stages.explainer",
    "grad_cam": "gencnp_jax.eval.saliency",
    "pathway_gradient": "gencnp_jax.eval.saliency",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gencnp_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
