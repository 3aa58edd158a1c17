"""Gated classifiers: identity of open gates, causality of closed ones, feature shapes, fills."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib

B, HW = 4, 16
IMAGES = jax.random.normal(jax.random.key(0), (B, HW, HW, 1))
LABELS = jnp.arange(B) % 10
# Two convs per VGG stage; two blocks per ResNet stage, so ResNet has both identity and
# projection shortcuts (stage1_block2 and stage2_block2 add their input unchanged).
ARCHS = {"vgg": ((8, 16, 16), 2), "resnet": ((8, 16), 2)}  # the tiny config's conv shapes
EXPECTED_FEATURES = {  # site -> (H, W, C) for 16x16 inputs, worked out by hand
    "vgg": {
        "block1/conv1": (16, 16, 8),
        "block1/conv2": (16, 16, 8),
        "block2/conv1": (8, 8, 16),
        "block2/conv2": (8, 8, 16),
        "block3/conv1": (4, 4, 16),
        "block3/conv2": (4, 4, 16),
    },
    "resnet": {
        "stem/conv": (16, 16, 8),
        "stage1_block1/conv1": (16, 16, 8),
        "stage1_block2/conv1": (16, 16, 8),
        "stage2_block1/conv1": (8, 8, 16),
        "stage2_block2/conv1": (8, 8, 16),
    },
}


@functools.cache
def _model(name):
    widths, depth = ARCHS[name]
    return classifiers.make_classifier(name, widths, 10, 1, depth, seed=0)


def _kernel_path(site):
    """Module path of the conv that produces `site`: ``stem/conv`` is itself the conv."""
    return ("stem", "conv") if site == "stem/conv" else (*site.split("/"), "conv")


def _get(state, path):
    for key in path:
        state = state[key]
    return state


def _with_closed(site_channels, site, channel, batch=B):
    gates = gates_lib.all_ones(site_channels, batch)
    gates[site] = gates[site].at[:, channel].set(0.0)
    return gates


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_features_match_site_channels(name):
    model = _model(name)
    logits, features = model(IMAGES)
    chex.assert_shape(logits, (B, 10))
    assert list(model.site_channels) == list(EXPECTED_FEATURES[name])  # shallow to deep
    assert list(features) == list(model.site_channels)
    for site, hwc in EXPECTED_FEATURES[name].items():
        assert model.site_channels[site] == hwc[-1]
        chex.assert_shape(features[site], (B, *hwc))
        assert float(jnp.min(features[site])) >= 0.0  # after the ReLU, before the gate


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_all_ones_gates_are_bitwise_the_full_model(name):
    model = _model(name)
    graphdef, state = classifiers.split(model)
    full_logits, full_features = classifiers.forward(graphdef, state, IMAGES)
    channel_gates = gates_lib.all_ones(model.site_channels, B)
    element_gates = {s: jnp.ones(f.shape) for s, f in full_features.items()}
    fills = {s: jnp.full((c,), 0.7) for s, c in model.site_channels.items()}
    for gates, f in ((channel_gates, None), (element_gates, None), (channel_gates, fills)):
        logits, features = classifiers.forward(graphdef, state, IMAGES, gates, f)
        chex.assert_trees_all_equal(logits, full_logits)
        chex.assert_trees_all_equal(features, full_features)
    fwd = jax.jit(lambda s, x, g: classifiers.forward(graphdef, s, x, g)[0])
    chex.assert_trees_all_equal(fwd(state, IMAGES, channel_gates), fwd(state, IMAGES, None))
    # The module call and the pure forward agree (inference mode).
    chex.assert_trees_all_equal(model(IMAGES, channel_gates)[0], full_logits)


@functools.cache
def _grad_fn(name):
    """Jitted ``(params, gates) -> dLoss/dparams`` (inference mode), one compile per arch."""
    graphdef, _, rest = nnx.split(_model(name), nnx.Param, ...)

    def loss_fn(params, gates):
        logits, _ = nnx.merge(graphdef, params, rest)(IMAGES, gates, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

    return jax.jit(jax.grad(loss_fn))


def _cross_entropy_grads(name, gates):
    params = nnx.state(_model(name), nnx.Param)
    return _grad_fn(name)(params, gates)


@pytest.mark.parametrize(
    "name,site",
    [
        ("vgg", "block1/conv1"),
        ("vgg", "block2/conv2"),
        ("vgg", "block3/conv2"),
        ("resnet", "stem/conv"),
        ("resnet", "stage1_block2/conv1"),  # identity-shortcut block
        ("resnet", "stage2_block1/conv1"),  # projection-shortcut block
    ],
)
def test_zero_gate_kills_the_gradient_through_its_channel(name, site):
    """The conv kernel slice (and BN scale/bias) that makes channel k of a site gets exactly
    zero gradient when k's gate is closed for every instance, and a non-zero one when open."""
    site_channels = _model(name).site_channels
    k = 1
    open_grads = _cross_entropy_grads(name, gates_lib.all_ones(site_channels, B))
    closed_grads = _cross_entropy_grads(name, _with_closed(site_channels, site, k))
    path = _kernel_path(site)
    bn_path = (*path[:-1], "bn")
    kernel_open = _get(open_grads, path)["kernel"][...]
    kernel_closed = _get(closed_grads, path)["kernel"][...]
    assert np.any(np.asarray(kernel_open[..., k]) != 0.0)
    np.testing.assert_array_equal(kernel_closed[..., k], 0.0)
    for leaf in ("scale", "bias"):
        assert _get(open_grads, bn_path)[leaf][...][k] != 0.0
        assert _get(closed_grads, bn_path)[leaf][...][k] == 0.0
    # Only channel k is cut: the other channels of the site still learn.
    others = np.delete(np.asarray(kernel_closed), k, axis=-1)
    assert np.any(others != 0.0)


@pytest.mark.parametrize("name,site", [("vgg", "block2/conv1"), ("resnet", "stage1_block1/conv1")])
def test_closed_channel_no_longer_affects_the_logits(name, site):
    """Forward form of causality: perturbing the weights of a closed channel changes nothing."""
    model = _model(name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    k = 2
    perturbed = jax.tree.map(lambda x: x, params)  # a copy of the tree structure
    kernel = _get(perturbed, _kernel_path(site))["kernel"]
    kernel[...] = kernel[...].at[..., k].add(1.0)
    gates = _with_closed(model.site_channels, site, k)

    def logits(p, g):
        return nnx.merge(graphdef, p, rest)(IMAGES, g)[0]

    chex.assert_trees_all_equal(logits(perturbed, gates), logits(params, gates))
    assert not np.allclose(logits(perturbed, None), logits(params, None))


def test_closed_gates_with_fills_pass_the_fill_value():
    """Mean ablation: closing the whole last VGG site with fill f feeds f to the head."""
    model = _model("vgg")
    graphdef, state = classifiers.split(model)
    last = list(model.site_channels)[-1]
    c = model.site_channels[last]
    fill = jnp.linspace(0.1, 0.8, c)
    gates = gates_lib.all_ones(model.site_channels, B)
    gates[last] = jnp.zeros((B, c))
    logits, _ = classifiers.forward(graphdef, state, IMAGES, gates, {last: fill})
    expected = jnp.broadcast_to(model.head(fill[None]), (B, 10))
    chex.assert_trees_all_close(logits, expected, rtol=1e-6, atol=1e-6)
    # Zero ablation (no fills) is a different model: the head sees zeros.
    zero_logits, _ = classifiers.forward(graphdef, state, IMAGES, gates)
    chex.assert_trees_all_close(
        zero_logits, jnp.broadcast_to(model.head(jnp.zeros((1, c))), (B, 10))
    )
    assert not np.allclose(logits, zero_logits)


def test_closed_site_makes_deeper_features_input_independent():
    model = _model("vgg")
    graphdef, state = classifiers.split(model)
    first, second = list(model.site_channels)[:2]
    gates = gates_lib.all_ones(model.site_channels, B)
    gates[first] = jnp.zeros_like(gates[first])
    fills = {first: jnp.full((model.site_channels[first],), 0.5)}
    _, features = classifiers.forward(graphdef, state, IMAGES, gates, fills)
    chex.assert_trees_all_close(
        features[second], jnp.broadcast_to(features[second][:1], (B, *features[second].shape[1:]))
    )
    _, full = classifiers.forward(graphdef, state, IMAGES)
    assert not np.allclose(full[second][0], full[second][1])


def test_make_classifier_unknown_name():
    with pytest.raises(ValueError, match="unknown classifier 'alexnet'.*config.classifier.name"):
        classifiers.make_classifier("alexnet", (4,), 10, 1)


def test_num_params_counts_only_params():
    model = _model("resnet")
    _, state = classifiers.split(model)
    params = nnx.state(model, nnx.Param)
    expected = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert classifiers.num_params(state) == expected
    batch_stats = nnx.state(model, nnx.BatchStat)
    assert jax.tree.leaves(batch_stats)  # BatchNorm statistics exist and are not counted
    assert expected < sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 5, 3), (2, 3, 3, 2)])
def test_max_pool_2x2_is_the_window_max_bit_for_bit(shape):
    """Values and gradients equal nnx.max_pool's, ties included (after a ReLU many windows are
    all zero: the gradient must go to the first corner only, not be split or copied)."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    x = x.at[0, 0, 1].set(x[0, 0, 0])  # a tie between two positive corners
    window = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
    y = classifiers.max_pool_2x2(x)
    chex.assert_trees_all_equal(y, window(x))
    r = jax.random.normal(jax.random.key(1), y.shape)
    grad = jax.jit(jax.grad(lambda x, pool: jnp.sum(pool(x) * r)), static_argnums=1)
    ours, reference = grad(x, classifiers.max_pool_2x2), grad(x, window)
    chex.assert_trees_all_equal(ours, reference)
    assert int(jnp.sum(ours != 0)) == int(np.prod(y.shape))  # one corner per window


def test_vgg_backward_compiles_without_a_scatter():
    """The built-in VGG's gradient has no scatter on CPU: XLA lowers the window max's gradient
    (select-and-scatter) to one, which took half of the first-order read (`max_pool_2x2`)."""
    model = classifiers.make_classifier("vgg", (4, 8), 3, 1)
    graphdef, state = nnx.split(model)
    total = lambda x: jnp.sum(nnx.merge(graphdef, state)(x)[0])
    hlo = jax.jit(jax.grad(total)).lower(jnp.ones((2, 8, 8, 1))).compile().as_text()
    assert " scatter(" not in hlo and "select-and-scatter(" not in hlo
