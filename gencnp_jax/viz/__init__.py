"""Figures and the static HTML report. The figures a notebook draws::

    from gencnp_jax import viz
    fig, ax = viz.plot_site_masks(gates_of_one_image, title)

Every plot function returns ``(fig, ax)`` and never calls ``show()``.
"""

from gencnp_jax.viz.plots import plot_density_hist, plot_gallery, plot_site_masks

__all__ = ["plot_density_hist", "plot_gallery", "plot_site_masks"]
