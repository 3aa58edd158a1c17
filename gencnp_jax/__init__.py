"""gencnp_jax: which neurons a vision model uses for a decision (GEN-CNP neural pathways).

The public API, imported on first use (importing the package stays cheap)::

    import gencnp_jax
    gated = gencnp_jax.attach(model, ["block*/conv*"], example_input=x)  # any Flax NNX / Linen
    logits, features = gated.forward(gated.state, x, gates)              # pure, jit-able
    gencnp_jax.save_weights(model, "w.npz"); gencnp_jax.load_weights(model, "w.npz")
    gencnp_jax.run_pipeline(config, workdir)         # classifier, generator, bank, eval, report
    explainer = gencnp_jax.Explainer.from_workdir(workdir)
    pathway = explainer(images)                      # Pathway: gates, scores, logits

Figures: `gencnp_jax.viz` (``plot_site_masks``, ``plot_density_hist``, ``plot_gallery``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from gencnp_jax.context.inputs import load_data as load_split
    from gencnp_jax.eval.saliency import grad_cam, pathway_gradient
    from gencnp_jax.explainer import Explainer
    from gencnp_jax.io.data import class_names, normalize
    from gencnp_jax.io.weights import load_weights, save_weights
    from gencnp_jax.method.class_bank import ClassBank
    from gencnp_jax.method.explain import explain, jit_explain
    from gencnp_jax.method.pathway import Pathway
    from gencnp_jax.models.attach import attach, list_sites
    from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
    from gencnp_jax.models.gating import GatedClassifier
    from gencnp_jax.stages.pipeline import run_pipeline

# Public name -> "module" (the same name there) or "module:attr" (another name there).
_EXPORTS = {
    "attach": "gencnp_jax.models.attach",
    "list_sites": "gencnp_jax.models.attach",
    "GatedClassifier": "gencnp_jax.models.gating",
    "FrozenClassifier": "gencnp_jax.models.frozen",
    "FrozenGenerator": "gencnp_jax.models.frozen",
    "Pathway": "gencnp_jax.method.pathway",
    "ClassBank": "gencnp_jax.method.class_bank",
    "explain": "gencnp_jax.method.explain",
    "jit_explain": "gencnp_jax.method.explain",
    "Explainer": "gencnp_jax.explainer",
    "run_pipeline": "gencnp_jax.stages.pipeline",
    "load_split": "gencnp_jax.context.inputs:load_data",
    "grad_cam": "gencnp_jax.eval.saliency",
    "pathway_gradient": "gencnp_jax.eval.saliency",
    "class_names": "gencnp_jax.io.data",
    "normalize": "gencnp_jax.io.data",
    "save_weights": "gencnp_jax.io.weights",
    "load_weights": "gencnp_jax.io.weights",
}
__all__ = [  # written out, so that linters and type checkers read it
    "ClassBank",
    "Explainer",
    "FrozenClassifier",
    "FrozenGenerator",
    "GatedClassifier",
    "Pathway",
    "attach",
    "class_names",
    "explain",
    "grad_cam",
    "jit_explain",
    "list_sites",
    "load_split",
    "load_weights",
    "normalize",
    "pathway_gradient",
    "run_pipeline",
    "save_weights",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gencnp_jax' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
