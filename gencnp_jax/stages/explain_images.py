"""The explain mode: pathways, figures and a page for given images (or the first test images).

Reads ``config.explain.images`` (``npz:FILE``, ``folder:DIR`` or a plain path; ``""`` = the
first `TEST_IMAGES` test images) and writes, under ``WORKDIR/explain``: ``pathways.npz``, one
PNG per image and ``explain.html``.
"""

from __future__ import annotations

import html
import os
import re
import time

import jax
import numpy as np

from gencnp_jax import explainer as explainer_lib
from gencnp_jax.context import inputs
from gencnp_jax.io import custom_data, data, writers
from gencnp_jax.method.pathway import Pathway
from gencnp_jax.stages import report as report_stage
from gencnp_jax.stages import validation
from gencnp_jax.viz import explain_figure, plots
from gencnp_jax.viz import html as html_lib

PAGE, PATHWAYS = "explain.html", "pathways.npz"
TEST_IMAGES = 16  # explained when no images are named (the first test images)
_FIGURE = re.compile(r"explain_\d+\.png")  # this mode's figure names (stale ones are removed)


def load_images(config) -> tuple[np.ndarray, list[str]]:
    """The images to explain, ``u8[N, H, W, C]``, and a name for each.

    Raises:
      validation.ConfigError: unreadable, none, not uint8, or not of the classifier's input
        size; one line naming ``config.explain.images`` and the fix.
    """
    e, d = config.explain, config.data
    if e.images:
        where = f"config.explain.images={e.images!r}"
        try:
            images, names = custom_data.read_images(e.images)
        except (custom_data.DatasetError, data.DatasetError, OSError, ValueError) as err:
            raise validation.ConfigError(f"{where}: {err}") from None
    else:
        where = f"the test split of {d.dataset!r}"
        images = inputs.load_data(config, "test").images[:TEST_IMAGES]
        names = [f"test #{i}" for i in range(len(images))]
    images = np.asarray(images)
    hwc, _ = data.dataset_info(d.dataset, os.path.expanduser(d.data_dir))
    size = lambda shape: "x".join(map(str, shape))
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(hwc):
        got = size(images.shape[1:]) if images.ndim == 4 else f"of shape {images.shape}"
        raise validation.ConfigError(
            f"{where}: the images are {got} (HxWxC), the classifier takes {size(hwc)}: give "
            f"images of that size and number of channels"
        )
    if images.dtype != np.uint8 or not len(images):
        raise validation.ConfigError(
            f"{where}: {len(images)} images of {images.dtype}: give uint8 pixels (0..255)"
        )
    return images, [str(n) for n in names]


def out_dir(workdir: str) -> str:
    """``WORKDIR/explain``: where the explain mode writes."""
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "explain")


def save_pathways(path: str, pathway: Pathway, names: list[str], class_names: list[str]):
    """Writes `pathway` as `Pathway.save` does (`Pathway.load` reads it back), plus ``density``
    ``f32[N]``, ``pathway_class`` ``i32[N]``, the image ``names`` and ``class_names``."""
    flat = pathway.flat_arrays()
    flat["density"] = np.asarray(pathway.density(), np.float32)
    flat["pathway_class"] = np.argmax(flat["pathway_logits"], -1).astype(np.int32)
    flat["names"] = np.asarray(names, dtype=str)
    flat["class_names"] = np.asarray(class_names, dtype=str)
    with writers.atomic_file(path, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, **flat)


def _page(folder: str, rows: list[dict], site: str, source: str) -> str:
    """``explain.html``: a table of every image, then its figure (`viz.html`'s style)."""
    e = html.escape
    cols = ("#", "image", "predicted", "pathway predicts", "keeps prediction", "density")
    head = "".join(f"<th>{c}</th>" for c in (*cols, "figure"))
    body = []
    for i, r in enumerate(rows):
        keeps = "✓ yes" if r["keeps"] else "✗ no"
        cells = (i, r["name"], r["predicted"], r["pathway"], keeps, f"{r['density']:.3f}")
        tds = "".join(f'<td class="text">{e(str(c))}</td>' for c in cells)
        link = f'<a href="{e(r["png"])}">{e(r["png"])}</a>'
        body.append(f"<tr>{tds}<td>{link}</td></tr>")
    figures = "".join(
        html_lib._figure_html(os.path.join(folder, r["png"]), r["caption"], folder) for r in rows
    )
    kept = np.mean([r["keeps"] for r in rows])
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>GEN-CNP explanations</title><style>{html_lib.CSS}</style></head><body>"
        f'<h1>GEN-CNP explanations</h1><p class="muted">{e(source)}: {len(rows)} images; the '
        f"pathway keeps the prediction of {kept:.0%}; Grad-CAM at {e(site)}</p>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
        f'<h2>Figures</h2><div class="gallery">{figures}</div></body></html>\n'
    )


def explain_images(config, workdir: str) -> dict:
    """Explains ``config.explain.images`` with the trained classifier and generator of
    `workdir`; writes ``pathways.npz``, ``explain_NNNN.png`` per image and ``explain.html``
    (last) into `out_dir`.

    Each figure shows the input, Grad-CAM of the full and of the pathway model and the
    pathway gradient for the predicted class (`Explainer.saliency_fn`), and the channels
    kept at each site.

    Returns:
      A summary: ``num_images``, ``out_dir``, ``pathways`` and ``page`` paths,
      ``density_mean``, ``keeps_prediction`` (the fraction of images), ``seconds``.

    Raises:
      validation.ConfigError: the images cannot be read or are not of the classifier's size
        (raised before anything is written).
      workdir_lib.StageOrderError: no trained classifier or generator in `workdir`.
    """
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    images, names = load_images(config)  # first: a bad image file fails before any work
    explainer = explainer_lib.Explainer.from_workdir(workdir, config)
    cls = explainer.classifier
    site = report_stage.gradcam_site(config, cls.site_channels)
    classes = report_stage.class_names(config.data.dataset, cls.num_classes)
    pathway = explainer(images)
    normalized = explainer.prepare(images)
    saliency_fn = explainer.saliency_fn(site)
    cam_full, cam_pathway, grad = explainer.map_batches(saliency_fn, normalized, desc="saliency")
    pred = np.asarray(pathway.explained_class)
    pathway_pred = np.argmax(np.asarray(pathway.pathway_logits), -1)
    density = np.asarray(pathway.density())
    folder = out_dir(workdir)
    summary = {
        "num_images": len(images),
        "out_dir": folder,
        "pathways": os.path.join(folder, PATHWAYS),
        "page": os.path.join(folder, PAGE),
        "density_mean": float(density.mean()),
        "keeps_prediction": float(np.mean(pred == pathway_pred)),
    }
    if jax.process_index() != 0:
        return summary
    os.makedirs(folder, exist_ok=True)
    for stale in [n for n in os.listdir(folder) if _FIGURE.fullmatch(n) or n == PAGE]:
        os.remove(os.path.join(folder, stale))  # the page is written last, once all is there
    save_pathways(summary["pathways"], pathway, names, classes)
    gates = {s: np.asarray(g) for s, g in pathway.gates.items()}
    rows = []
    with writers.progress(len(images), desc="explain figures") as bar:
        for i, name in enumerate(names):
            keeps = pred[i] == pathway_pred[i]
            title = f"{name}\n→ {classes[pred[i]]}\npathway → {classes[pathway_pred[i]]}"
            row = (normalized[i], cam_full[i], cam_pathway[i], grad[i], title)
            fig, _ = explain_figure.plot_explanation(row, {s: g[i] for s, g in gates.items()})
            png = f"explain_{i:04d}.png"
            plots.save(fig, os.path.join(folder, png))
            caption = (
                f"{name}: predicted {classes[pred[i]]}, pathway predicts "
                f"{classes[pathway_pred[i]]} ({'keeps' if keeps else 'changes'} it), "
                f"density {density[i]:.3f}"
            )
            rows.append(
                dict(
                    name=name,
                    predicted=classes[pred[i]],
                    pathway=classes[pathway_pred[i]],
                    keeps=bool(keeps),
                    density=float(density[i]),
                    png=png,
                    caption=caption,
                )
            )
            bar.update()
    source = config.explain.images or f"the first {len(images)} test images"
    writers.write_text(summary["page"], _page(folder, rows, site, source))
    summary["seconds"] = round(time.time() - t0, 1)
    print(f"[explain] {len(images)} images explained: {summary['page']}", flush=True)
    return summary
