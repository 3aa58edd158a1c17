"""The figure of one explained image (``--mode=explain``): its saliency maps and its pathway.

One PNG per image: the gallery row of `plots` on top, the channels kept at each site below.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.patches import Patch

from gencnp_jax.viz import plots

ROW_IN, SITE_IN = 2.4, 0.3  # heights of the saliency row and of one site's mask row, inches


def plot_explanation(row: plots.GalleryRow, gates_one_instance: Mapping[str, np.ndarray]):
    """One explained image: the input, Grad-CAM of the full and of the pathway model and the
    pathway gradient (as `plots.plot_gallery_row`), and below them the channels the pathway
    keeps at each site (as `plots.plot_site_masks`).

    Args:
      row: ``(image_HxWxC, cam_full_HxW, cam_pathway_HxW, pathway_grad_HxWxC, title)``.
      gates_one_instance: ``site -> f32[C]`` of this image, shallow site first (kept = >= 0.5).

    Returns:
      ``(fig, axes)``: the row's four axes, then the mask axes.
    """
    sites = list(gates_one_instance)
    masks_in = 0.9 + SITE_IN * len(sites)
    fig = plots._figure(9, ROW_IN + masks_in)
    top, bottom = fig.subfigures(2, 1, height_ratios=(ROW_IN, masks_in))
    axes = top.subplots(1, 4)
    cam_im, grad_im = plots._draw_row(axes, row, headers=True)
    top.colorbar(cam_im, ax=axes[1:3], label="Grad-CAM", shrink=0.8)
    top.colorbar(grad_im, ax=axes[3], label="|dy_c/dx| (normalised)", shrink=0.8)

    grid, labels = plots.site_mask_grid(gates_one_instance)
    ax = bottom.add_subplot()
    ax.imshow(np.ma.masked_invalid(grid), cmap=plots.MASK_CMAP, **plots.HEATMAP)
    ax.set_yticks(range(len(sites)), labels, fontsize=8)
    ax.set_xlabel("channel", fontsize=8)
    density = np.nansum(grid) / np.sum(~np.isnan(grid))
    ax.set_title(f"kept channels per site (density {density:.3f})", fontsize=9)
    handles = [Patch(color=plots.MASK_CMAP(c), label=n) for c, n in ((1, "kept"), (0, "closed"))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig, [*axes, ax]
