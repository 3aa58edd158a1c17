"""Target classifiers with named gate sites (VGG- and ResNet-style), in Flax NNX.

Every model returns ``(logits, features)``: ``features[site]`` is the site's
activation *before* its gates; the gated activation is what flows on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.gating import GatedClassifier

CLASSIFIERS = ("vgg", "resnet")
Definition = nnx.GraphDef | GatedClassifier  # what `forward` runs: built-in or attached


def _window_corners(x_BxHxWxC):
    """The four corners of every 2x2 window (stride 2; an odd last row / column is dropped,
    as a VALID window max drops it), each ``[B, H//2, W//2, C]``, in row-major window order."""
    h2, w2 = x_BxHxWxC.shape[1] // 2, x_BxHxWxC.shape[2] // 2
    x = x_BxHxWxC[:, : 2 * h2, : 2 * w2]
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
    """``nnx.max_pool(x, (2, 2), strides=(2, 2))`` with the same gradient, computed faster.

    The gradient goes, as the window max's (select-and-scatter) does, to the first maximum of
    each window in row-major order: values and gradients are the same bit for bit
    (tests/test_classifiers.py). It is written out because XLA on CPU lowers select-and-scatter
    to a general scatter: 87 ms against 3 ms for one ``[256, 28, 28, 32]`` pool's gradient.
    """
    return nnx.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2))


def _max_pool_fwd(x_BxHxWxC):
    y_BxhxwxC = max_pool_2x2(x_BxHxWxC)
    return y_BxhxwxC, (x_BxHxWxC, y_BxhxwxC)


def _max_pool_bwd(residuals, g_BxhxwxC):
    x_BxHxWxC, y_BxhxwxC = residuals
    a, b, c, d = _window_corners(x_BxHxWxC)
    takes_a = a == y_BxhxwxC
    takes_b = (b == y_BxhxwxC) & ~takes_a
    takes_c = (c == y_BxhxwxC) & ~(takes_a | takes_b)
    takes_d = ~(takes_a | takes_b | takes_c)
    zero = jnp.zeros_like(g_BxhxwxC)
    ga, gb, gc, gd = (jnp.where(t, g_BxhxwxC, zero) for t in (takes_a, takes_b, takes_c, takes_d))
    bsz, h2, w2, ch = g_BxhxwxC.shape
    rows_Bxhx2xwx2xC = jnp.stack([jnp.stack([ga, gb], 3), jnp.stack([gc, gd], 3)], 2)
    g_Bx2hx2wxC = rows_Bxhx2xwx2xC.reshape(bsz, 2 * h2, 2 * w2, ch)
    height, width = x_BxHxWxC.shape[1:3]
    pad = ((0, 0), (0, height - 2 * h2), (0, width - 2 * w2), (0, 0))
    return (jnp.pad(g_Bx2hx2wxC, pad),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ConvBN(nnx.Module):
    """3x3 conv (no bias) followed by BatchNorm; the nonlinearity is the caller's."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class VGGStage(nnx.Module):
    """`num_convs` conv-BN-ReLU layers, each one gate site (``conv1``, ``conv2``…)."""

    def __init__(self, cin: int, cout: int, num_convs: int, *, rngs: nnx.Rngs):
        self.conv_names = tuple(f"conv{j + 1}" for j in range(num_convs))
        for j, name in enumerate(self.conv_names):
            setattr(self, name, ConvBN(cin if j == 0 else cout, cout, rngs=rngs))


class VGG(nnx.Module):
    """VGG-style CNN: stages of conv-BN-ReLU, 2x2 max-pool between stages, GAP, dense."""

    def __init__(
        self,
        widths: Sequence[int],
        num_classes: int,
        in_channels: int,
        convs_per_stage: int = 1,
        *,
        rngs: nnx.Rngs,
    ):
        self.stage_names = tuple(f"block{i + 1}" for i in range(len(widths)))
        cin = in_channels
        for name, width in zip(self.stage_names, widths, strict=True):
            setattr(self, name, VGGStage(cin, width, convs_per_stage, rngs=rngs))
            cin = width
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)
        self.site_channels = {
            f"{name}/{conv}": w
            for name, w in zip(self.stage_names, widths, strict=True)
            for conv in getattr(self, name).conv_names
        }

    def __call__(self, x, gates=None, fills=None, train: bool = False):
        features = {}
        for name in self.stage_names:
            stage = getattr(self, name)
            for conv in stage.conv_names:
                site = f"{name}/{conv}"
                x = nnx.relu(getattr(stage, conv)(x, train))
                features[site] = x
                x = gates_lib.apply_gate(x, site, gates, fills)
            if min(x.shape[1:3]) >= 2:
                x = max_pool_2x2(x)
        return self.head(jnp.mean(x, axis=(1, 2))), features


class BasicBlock(nnx.Module):
    """ResNet basic block; its gate site is the inner activation after ``conv1``."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = ConvBN(cin, cout, stride=stride, rngs=rngs)
        self.conv2 = ConvBN(cout, cout, rngs=rngs)
        needs_proj = stride != 1 or cin != cout
        self.proj = nnx.data(
            nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            if needs_proj
            else None
        )

    def __call__(self, x, site, gates, fills, features, train):
        inner = nnx.relu(self.conv1(x, train))
        features[site] = inner
        inner = gates_lib.apply_gate(inner, site, gates, fills)
        shortcut = x if self.proj is None else self.proj(x)
        return nnx.relu(self.conv2(inner, train) + shortcut)


class ResNet(nnx.Module):
    """ResNet-style CNN: a gated stem, stages of basic blocks (stride 2 after the first)."""

    def __init__(
        self,
        widths: Sequence[int],
        num_classes: int,
        in_channels: int,
        blocks_per_stage: int = 1,
        *,
        rngs: nnx.Rngs,
    ):
        self.stem = ConvBN(in_channels, widths[0], rngs=rngs)
        self.site_channels = {"stem/conv": widths[0]}
        self.block_names = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                name = f"stage{i + 1}_block{j + 1}"
                stride = 2 if (i > 0 and j == 0) else 1
                setattr(self, name, BasicBlock(cin, width, stride, rngs=rngs))
                self.site_channels[f"{name}/conv1"] = width
                self.block_names.append(name)
                cin = width
        self.block_names = tuple(self.block_names)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x, gates=None, fills=None, train: bool = False):
        features = {}
        x = nnx.relu(self.stem(x, train))
        features["stem/conv"] = x
        x = gates_lib.apply_gate(x, "stem/conv", gates, fills)
        for name in self.block_names:
            x = getattr(self, name)(x, f"{name}/conv1", gates, fills, features, train)
        return self.head(jnp.mean(x, axis=(1, 2))), features


def make_classifier(
    name: str,
    widths: Sequence[int],
    num_classes: int,
    in_channels: int,
    depth: int = 1,
    seed: int = 0,
) -> VGG | ResNet:
    """Builds a classifier by name; `depth` is convs per VGG stage or blocks per ResNet stage."""
    rngs = nnx.Rngs(seed)
    if name == "vgg":
        return VGG(widths, num_classes, in_channels, depth, rngs=rngs)
    if name == "resnet":
        return ResNet(widths, num_classes, in_channels, depth, rngs=rngs)
    raise ValueError(
        f"unknown classifier {name!r}: choose one of {CLASSIFIERS} (config.classifier.name)"
    )


def forward(graphdef: Definition, state, images, gates=None, fills=None):
    """Pure inference pass: ``(logits_BxK, features)``; BatchNorm uses running statistics.

    `graphdef` is a built-in classifier's NNX GraphDef, or a `GatedClassifier` (`attach`: a
    user's model gated at its sites), whose own forward then runs on `state`.
    """
    if isinstance(graphdef, GatedClassifier):
        return graphdef.forward(state, images, gates, fills)
    model = nnx.merge(graphdef, state)
    return model(images, gates, fills, train=False)


def site_channels(graphdef: Definition, state) -> dict[str, int]:
    """Gate site -> channel count, shallow to deep."""
    if isinstance(graphdef, GatedClassifier):
        return dict(graphdef.site_channels)
    return dict(nnx.merge(graphdef, state).site_channels)


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a classifier: the form that crosses jit."""
    return nnx.split(model)


def num_params(state) -> int:
    """Parameter count of an NNX state (its `nnx.Param`s) or Linen variables (``params``)."""
    if isinstance(state, nnx.State):
        params = nnx.split_state(state, nnx.Param, ...)[0]
    else:
        params = state.get("params", state)
    return int(sum(x.size for x in jax.tree.leaves(params)))
