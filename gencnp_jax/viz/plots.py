"""Figures of pathways and explanations: site masks, class frequencies, densities, galleries.

Headless by construction: figures are `matplotlib.figure.Figure` on an Agg canvas (no pyplot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DPI = 130
MASK_CMAP = ListedColormap(["#dddddd", "#1f77b4"])  # closed, kept
LABEL_BOX = dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8)
HEATMAP = dict(vmin=0, vmax=1, aspect="auto", interpolation="nearest")
GalleryRow = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: gives a renderer for text extents and savefig
    return fig


def site_mask_grid(gates_one_instance) -> tuple[np.ndarray, list[str]]:
    """One row per site (NaN past its channel count), 1 where the channel is kept, and the
    row labels ``"site  (kept/total)"``."""
    width = max(np.asarray(g).size for g in gates_one_instance.values())
    grid = np.full((len(gates_one_instance), width), np.nan)
    labels = []
    for i, (site, g) in enumerate(gates_one_instance.items()):
        kept = np.asarray(g).reshape(-1) >= 0.5
        grid[i, : kept.size] = kept
        labels.append(f"{site}  ({kept.sum()}/{kept.size})")
    return grid, labels


def plot_site_masks(gates_one_instance: Mapping[str, np.ndarray], title: str = "pathway"):
    """Which channels one pathway keeps: one row per site (shallow on top), one cell per channel.

    Args:
      gates_one_instance: ``site -> f32[C]`` gates of one instance (kept = >= 0.5).
      title: figure title.

    Returns:
      ``(fig, ax)``.
    """
    sites = list(gates_one_instance)
    grid, labels = site_mask_grid(gates_one_instance)
    fig = _figure(10, 1.4 + 0.35 * len(sites))
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(grid), cmap=MASK_CMAP, **HEATMAP)
    ax.set_yticks(range(len(sites)), labels)
    ax.set_xlabel("channel")
    kept_all = np.nansum(grid) / np.sum(~np.isnan(grid))
    ax.set_title(f"{title} (density {kept_all:.3f})")
    handles = [Patch(color=MASK_CMAP(1), label="kept"), Patch(color=MASK_CMAP(0), label="closed")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig, ax


def plot_class_frequency(freq: Mapping[str, np.ndarray], class_names: Sequence[str]):
    """Class-pathway frequency maps ``F_c[l, k]``: one heatmap (class x channel) per site.

    Args:
      freq: ``site -> f32[K, C]``, the fraction of class-c samples that keep channel k.
      class_names: the K class names (rows).

    Returns:
      ``(fig, axes)`` with one axes per site.
    """
    sites = list(freq)
    k = len(class_names)
    fig = _figure(10, 0.8 + len(sites) * (0.9 + 0.2 * k))
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]
    for ax, site in zip(axes, sites, strict=True):
        im = ax.imshow(np.asarray(freq[site]), cmap="viridis", **HEATMAP)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_title(site, fontsize=9)
    axes[-1].set_xlabel("channel")
    fig.colorbar(im, ax=axes, label="frequency $F_c$", shrink=min(1.0, 4 / len(sites) + 0.2))
    fig.suptitle("class-pathway frequency per site")
    return fig, axes


def plot_density_hist(densities_N: np.ndarray, per_class: Mapping[str, np.ndarray] | None = None):
    """Instance-specific sparsity: histogram of pathway densities (and per class box plots).

    Args:
      densities_N: density of each instance's pathway.
      per_class: optional ``class name -> densities of that class's instances``.

    Returns:
      ``(fig, ax)``; ``ax`` is a pair of axes when `per_class` is given.
    """
    d = np.asarray(densities_N, np.float64).reshape(-1)
    fig = _figure(11 if per_class else 6, 4)
    axes = fig.subplots(1, 2 if per_class else 1, squeeze=False)[0]
    ax = axes[0]
    ax.hist(d, bins=min(40, max(5, d.size // 10)), color="#1f77b4", edgecolor="white")
    ax.axvline(d.mean(), color="k", linestyle="--", label=f"mean {d.mean():.3f}")
    ax.set_xlabel("density (kept neurons / all neurons)")
    ax.set_ylabel("instances")
    ax.set_title(f"pathway density, N={d.size}, std {d.std():.3f}")
    ax.legend(frameon=False)
    if per_class:
        names = list(per_class)
        axes[1].boxplot([np.asarray(per_class[n]).reshape(-1) for n in names])
        axes[1].set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
        axes[1].set_ylabel("density")
        axes[1].set_title("density per class")
    return fig, (axes if per_class else ax)


def _place_labels(ax, xs: np.ndarray, ys: np.ndarray, names: Sequence[str]) -> None:
    """Annotates points, choosing for each the offset that overlaps least with earlier labels."""
    fig = ax.figure
    fig.canvas.draw()  # settles the layout so display coordinates are final
    renderer = fig.canvas.get_renderer()
    ax_box = ax.get_window_extent(renderer)
    taken = [ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True)]
    taken = [(px - 8, py - 8, px + 8, py + 8) for px, py in taken]  # the markers
    # Eight directions around the point, near first, then further out with a leader line.
    dirs = [(1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1)]
    cands = [(r * ux, r * uy, ux, uy) for r in (8, 24) for ux, uy in dirs]
    for x, y, name in zip(xs, ys, names, strict=True):
        best, best_cost = None, np.inf
        for dx, dy, ux, uy in cands:
            kw = dict(ha=("center", "left", "right")[ux], va=("center", "bottom", "top")[uy])
            t = ax.annotate(name, (x, y), (dx, dy), textcoords="offset points", fontsize=8, **kw)
            b = t.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            cost = sum(_overlap(box, o) for o in taken)
            cost += b.width * b.height - _overlap(box, tuple(ax_box.extents))
            t.remove()
            if cost < best_cost:
                best, best_cost = (dx, dy, kw, box), cost
        dx, dy, kw, box = best
        arrow = dict(arrowstyle="-", lw=0.6, color="0.4") if abs(dx) + abs(dy) > 8 else None
        ax.annotate(
            name,
            (x, y),
            (dx, dy),
            textcoords="offset points",
            fontsize=8,
            bbox=LABEL_BOX,
            arrowprops=arrow,
            **kw,
        )
        taken.append(box)


def _overlap(a: tuple, b: tuple) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def plot_density_vs_mdc(results_methods: Mapping[str, Mapping[str, float]]):
    """GEN-CNP against the baselines: mean density (x) against mDC (y), one point per method.

    Args:
      results_methods: ``method -> metrics`` (needs ``density_mean`` and ``mDC``; an optional
        ``density_std`` becomes a horizontal error bar). Methods missing either are skipped.

    Returns:
      ``(fig, ax)``.
    """
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    names, xs, ys = [], [], []
    for name, m in results_methods.items():
        x, y = m.get("density_mean"), m.get("mDC")
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
            continue
        ours = name.startswith("gencnp")
        style = dict(fmt="*", ms=12, color="C3") if ours else dict(fmt="o", ms=7, color="C0")
        ax.errorbar(x, y, xerr=m.get("density_std"), capsize=3, elinewidth=1, **style)
        names.append(name), xs.append(x), ys.append(y)
    ax.set_xlabel("mean pathway density (lower = sparser)")
    ax.set_ylabel("mDC, % (lower = more faithful)")
    ax.set_title("sparsity vs. faithfulness (* = GEN-CNP)")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    if names:
        _place_labels(ax, np.asarray(xs), np.asarray(ys), names)
    return fig, ax


def _to_display(image_HxWxC: np.ndarray) -> tuple[np.ndarray, str | None]:
    img = np.asarray(image_HxWxC, np.float64)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0], "gray"
    return img, None


def _draw_row(axes, row: GalleryRow, headers: bool):
    image, cam_full, cam_pathway, grad, title = row
    img, cmap = _to_display(image)
    gray = img if img.ndim == 2 else img.mean(-1)
    axes[0].imshow(img, cmap=cmap)
    axes[0].set_ylabel(title, fontsize=9)
    for ax, cam in ((axes[1], cam_full), (axes[2], cam_pathway)):
        ax.imshow(gray, cmap="gray")
        cam_im = ax.imshow(np.asarray(cam), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    # Saliency-map convention (Simonyan et al. 2014): max |gradient| over colour channels.
    sal = np.abs(np.asarray(grad)).reshape(*np.shape(grad)[:2], -1).max(-1)
    grad_im = axes[3].imshow(sal / max(sal.max(), 1e-12), cmap="inferno", vmin=0, vmax=1)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    if headers:
        cols = ("input", "Grad-CAM (full)", "Grad-CAM (pathway)", "pathway gradient")
        for ax, col in zip(axes, cols, strict=True):
            ax.set_title(col, fontsize=9)
    return cam_im, grad_im


def plot_gallery(rows: Sequence[GalleryRow]):
    """Several explanation rows in one figure (see `plot_gallery_row` for a row's content).

    Args:
      rows: ``(image_HxWxC, cam_full_HxW, cam_pathway_HxW, pathway_grad_HxWxC, title)`` tuples.

    Returns:
      ``(fig, axes)`` with axes ``[len(rows), 4]``.
    """
    fig = _figure(9, 0.5 + 1.9 * len(rows))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for i, row in enumerate(rows):
        cam_im, grad_im = _draw_row(axes[i], row, headers=i == 0)
    fig.colorbar(cam_im, ax=axes[:, 1:3], label="Grad-CAM", shrink=0.8)
    fig.colorbar(grad_im, ax=axes[:, 3], label="|dy_c/dx| (normalised)", shrink=0.8)
    return fig, axes


def plot_gallery_row(
    image_HxWxC: np.ndarray,
    cam_full_HxW: np.ndarray,
    cam_pathway_HxW: np.ndarray,
    pathway_grad_HxWxC: np.ndarray,
    title: str,
):
    """One explained input: the image, Grad-CAM of the full and of the pathway model, and the
    pathway gradient.

    Returns:
      ``(fig, axes)`` with 4 axes.
    """
    fig, axes = plot_gallery(
        [(image_HxWxC, cam_full_HxW, cam_pathway_HxW, pathway_grad_HxWxC, title)]
    )
    return fig, axes[0]


def save(fig: Figure, path: str, dpi: int = DPI) -> str:
    """Writes `fig` as PNG (creating parent folders) and releases its contents; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # renamed into place once whole: never half a PNG
    try:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fig.clear()  # no pyplot registry to close from; clearing frees the artists now
    return path
