"""Tests of the explanation figures (plots.py) and the saliency maps behind them (saliency.py).

Tiny inputs only: every figure is built headless and written as PNG; saliency runs on a toy VGG.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.eval import saliency
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.viz import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITE = "block3/conv1"


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def toy():
    model = classifiers.make_classifier("vgg", (4, 8, 8, 8), 10, 1)
    graphdef, state = classifiers.split(model)
    classifier = FrozenClassifier(graphdef, state, model.site_channels, 10)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    # Jitted once per module: eager first calls compile every op, which is slower on CPU.
    cam = jax.jit(functools.partial(saliency.grad_cam, site=SITE))
    return graphdef, classifier, model.site_channels, images, jnp.array([3, 7]), cam


def _gates(site_channels, batch, closed_site=None):
    gates = gates_lib.all_ones(site_channels, batch)
    if closed_site is not None:  # close the first half of that site's channels
        c = site_channels[closed_site]
        gates[closed_site] = gates[closed_site].at[:, : c // 2].set(0.0)
    return gates


def test_grad_cam_shape_range_and_full_model_default(toy):
    graphdef, state, site_channels, images, classes, cam_fn = toy
    cam = cam_fn(state, images, classes)
    chex.assert_shape(cam, (2, 16, 16))
    chex.assert_tree_all_finite(cam)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert all(float(m) in (0.0, 1.0) for m in cam.max(axis=(1, 2)))  # per-image max-normalised
    ones = gates_lib.all_ones(site_channels, 2)
    chex.assert_trees_all_close(cam, cam_fn(state, images, classes, gates=ones), atol=1e-6)


def test_grad_cam_sees_the_gates(toy):
    graphdef, state, site_channels, images, classes, cam_fn = toy
    full = cam_fn(state, images, classes, gates=gates_lib.all_ones(site_channels, 2))
    cam = cam_fn(state, images, classes, gates=_gates(site_channels, 2, closed_site=SITE))
    assert float(jnp.max(jnp.abs(cam - full))) > 1e-3


def test_site_gradient_matches_multiplicative_element_gate(toy):
    # With zero fill, d y_c / d e at e = 1 for an element gate e equals (d y_c / d act) * act.
    graphdef, state, site_channels, images, classes, _ = toy
    act_and_grad = functools.partial(saliency.site_activation_and_grad, site=SITE)
    act, grad = jax.jit(act_and_grad)(state, images, classes)

    def logit_sum(e):
        gates = {**gates_lib.all_ones(site_channels, 2), SITE: e}
        logits = state.logits(images, gates)
        return jnp.sum(logits[jnp.arange(2), classes])

    grad_e = jax.jit(jax.grad(logit_sum))(jnp.ones(act.shape))
    assert float(jnp.max(jnp.abs(grad))) > 0
    chex.assert_trees_all_close(grad_e, grad * act, atol=1e-5)


def test_pathway_gradient_is_grad_of_gated_logit(toy):
    graphdef, state, site_channels, images, classes, _ = toy
    gates = _gates(site_channels, 2, closed_site="block2/conv1")
    pathway_gradient = jax.jit(saliency.pathway_gradient)
    got = pathway_gradient(state, images, classes, gates)
    chex.assert_shape(got, images.shape)

    @jax.jit
    def one_logit_grad(x_1xHxWxC, gates_1, c):
        logit = lambda x: state.logits(x, gates_1)[0, c]
        return jax.grad(logit)(x_1xHxWxC)[0]

    for i in range(2):
        one = {s: g[i : i + 1] for s, g in gates.items()}
        chex.assert_trees_all_close(
            got[i], one_logit_grad(images[i : i + 1], one, classes[i]), atol=1e-5
        )
    plain = pathway_gradient(state, images, classes, None)
    assert float(jnp.max(jnp.abs(plain - got))) > 1e-6  # the pathway changes the gradient


def test_site_masks_and_class_frequency(tmp_path):
    rng = np.random.default_rng(0)
    sites = {"block1/conv1": 4, "block2/conv1": 8}
    gates = {s: (rng.random(c) > 0.5).astype(np.float32) for s, c in sites.items()}
    fig, ax = plots.plot_site_masks(gates, "pathway <x>")
    assert "density" in ax.get_title()
    _assert_png(plots.save(fig, str(tmp_path / "masks.png")))
    fig, axes = plots.plot_class_frequency({s: rng.random((3, c)) for s, c in sites.items()}, "abc")
    assert len(axes) == 2
    _assert_png(plots.save(fig, str(tmp_path / "sub" / "freq.png")))


def test_density_plots(tmp_path):
    rng = np.random.default_rng(1)
    fig, ax = plots.plot_density_hist(rng.random(20))
    assert ax.get_xlabel()
    _assert_png(plots.save(fig, str(tmp_path / "hist.png")))
    fig, axes = plots.plot_density_hist(rng.random(20), {"a": rng.random(5), "b": rng.random(5)})
    assert len(axes) == 2
    _assert_png(plots.save(fig, str(tmp_path / "hist2.png")))
    methods = {
        "gencnp": {"density_mean": 0.1, "density_std": 0.02, "mDC": 3.0},
        "cdrp": {"density_mean": 0.1, "mDC": 5.0},
        "random": {"density_mean": 0.1, "mDC": 40.0},
        "no_density": {"mDC": 1.0},
    }
    fig, ax = plots.plot_density_vs_mdc(methods)
    assert sorted(t.get_text() for t in ax.texts) == ["cdrp", "gencnp", "random"]
    _assert_png(plots.save(fig, str(tmp_path / "dvm.png")))


def test_gallery(tmp_path):
    rng = np.random.default_rng(2)
    row = (
        rng.random((8, 8, 1)),
        rng.random((8, 8)),
        rng.random((8, 8)),
        rng.normal(size=(8, 8, 1)),
    )
    fig, axes = plots.plot_gallery_row(*row, "pred 3")
    assert len(axes) == 4
    _assert_png(plots.save(fig, str(tmp_path / "row.png")))
    rgb = (rng.random((8, 8, 3)), row[1], row[2], rng.normal(size=(8, 8, 3)), "rgb")
    fig, axes = plots.plot_gallery([(*row, "gray"), rgb])
    assert axes.shape == (2, 4)
    _assert_png(plots.save(fig, str(tmp_path / "gallery.png")))
