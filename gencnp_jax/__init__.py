"""gencnp_jax: which neurons a vision model uses for a decision (GEN-CNP neural pathways).

The public API, imported on first use (importing the package stays cheap)::

    import gencnp_jax
    gated = gencnp_jax.attach(model, ["block*/conv*"], example_input=x)  # any Flax NNX / Linen
    logits, features = gated.forward(gated.state, x, gates)              # pure, jit-able
    gencnp_jax.run_pipeline(config, workdir)         # classifier, generator, bank, eval, report
    explainer = gencnp_jax.Explainer.from_workdir(workdir)
    pathway = explainer(images)                      # Pathway: gates, scores, logits
"""

from __future__ import annotations

import importlib

# Public name -> "module" (the same name there) or "module:attr" (another name there).
_EXPORTS = {
    "attach": "gencnp_jax.models.attach",
    "list_sites": "gencnp_jax.models.attach",
    "GatedClassifier": "gencnp_jax.models.gating",
    "Pathway": "gencnp_jax.method.pathway",
    "ClassBank": "gencnp_jax.method.class_bank",
    "explain": "gencnp_jax.method.explain",
    "jit_explain": "gencnp_jax.method.explain",
    "Explainer": "gencnp_jax.explainer",
    "run_pipeline": "gencnp_jax.stages.pipeline:run_all",
    "load_split": "gencnp_jax.context.inputs:load_data",
    "grad_cam": "gencnp_jax.eval.saliency",
    "pathway_gradient": "gencnp_jax.eval.saliency",
    "class_names": "gencnp_jax.io.data",
    "normalize": "gencnp_jax.io.data",
    "save_weights": "gencnp_jax.io.weights",
    "load_weights": "gencnp_jax.io.weights",
    "plot_site_masks": "gencnp_jax.viz.plots",
    "plot_density_hist": "gencnp_jax.viz.plots",
    "plot_gallery": "gencnp_jax.viz.plots",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gencnp_jax' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
