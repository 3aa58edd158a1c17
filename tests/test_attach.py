"""`attach`: gate sites on Flax models that declare nothing about gates."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from user_models import MixerBlock

from gencnp_jax.models.attach import attach, list_sites

B, K = 4, 5


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, 16, 16, 3))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.act = nnx.relu
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, K, rngs=rngs)

    def __call__(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)))
        return self.head(self.drop(jnp.mean(h, axis=(1, 2))))


@pytest.fixture(scope="module")
def cnn():
    model = CNN(nnx.Rngs(0))
    model.bn1.mean.value = jnp.linspace(-0.2, 0.2, 8)  # non-trivial running statistics
    model.bn2.var.value = jnp.linspace(0.5, 2.0, 16)
    ref = nnx.clone(model)
    ref.eval()
    return model, ref


def test_cnn_identity_features_and_gating(cnn):
    model, ref = cnn
    x = images()
    gc = attach(model, ["bn*", "conv2", "act"], example_input=x)
    assert list(gc.site_channels.items()) == [("bn1", 8), ("act", 8), ("conv2", 16), ("bn2", 16)]
    assert not model.drop.deterministic  # the user's model is left as it was
    assert jax.tree.structure(gc.state) == jax.tree.structure(nnx.state(model))
    want = ref(x)
    ones = {s: jnp.ones((B, c)) for s, c in gc.site_channels.items()}
    for gates in (None, ones):
        logits, feats = gc.forward(gc.state, x, gates)
        chex.assert_trees_all_equal(logits, want)
    jitted = jax.jit(gc.forward)
    chex.assert_trees_all_equal(jitted(gc.state, x, ones)[0], jitted(gc.state, x)[0])
    h1 = ref.bn1(ref.conv1(x))
    h2 = ref.conv2(nnx.relu(h1))
    chex.assert_trees_all_equal(feats["bn1"], h1)
    chex.assert_trees_all_equal(feats["act"], nnx.relu(h1))
    chex.assert_trees_all_equal(feats["conv2"], h2)
    chex.assert_trees_all_equal(feats["bn2"], ref.bn2(h2))

    # a closed bn1 channel with a mean fill: conv2 sees the fill there
    c, fill = 3, jnp.full((8,), 0.7)
    closed = {"bn1": jnp.ones((B, 8)).at[:, c].set(0.0)}
    logits, feats = jitted(gc.state, x, closed, {"bn1": fill})
    chex.assert_trees_all_close(
        feats["conv2"], ref.conv2(nnx.relu(h1.at[..., c].set(0.7))), atol=1e-5
    )
    assert not jnp.allclose(logits, want)

    # grad: the closed channel passes no gradient to conv2's weights that read it
    params, rest = nnx.split_state(gc.state, nnx.Param, ...)

    def loss(params, x, gates):
        return jnp.sum(gc.forward(nnx.merge_state(params, rest), x, gates)[0] ** 2)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x, closed)
    kernel_grad = g_params["conv2"]["kernel"].value
    assert jnp.all(kernel_grad[:, :, c, :] == 0) and jnp.any(kernel_grad[:, :, c + 1, :] != 0)
    chex.assert_tree_all_finite(g_x)
    assert jnp.any(g_x != 0)

    # grad w.r.t. gates at hard (all-open) gates is the slope of the linear mix
    g_gates = jax.grad(loss, argnums=2)(params, x, ones)
    eps, s, j = 1e-2, "conv2", 5
    moved = {**ones, s: ones[s].at[:, j].add(-eps)}
    slope = (loss(params, x, ones) - loss(params, x, moved)) / eps
    chex.assert_trees_all_close(jnp.sum(g_gates[s][:, j]), slope, rtol=0.05)


class Mixer(nnx.Module):
    def __init__(self, rngs, n=16, d=8):
        self.embed = nnx.Linear(48, d, rngs=rngs)
        self.blocks = nnx.List([MixerBlock(n, d, rngs) for _ in range(2)])
        self.head = nnx.Linear(d, K, rngs=rngs)

    def __call__(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 48)
        h = self.embed(patches)
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=1))


def test_token_model_gates_last_axis():
    model, x = Mixer(nnx.Rngs(1)), images(1)
    gc = attach(model, "blocks/*/mlp/act", example_input=x)
    assert gc.site_channels == {"blocks/0/mlp/act": 16, "blocks/1/mlp/act": 16}
    ones = {s: jnp.ones((B, 16)) for s in gc.site_channels}
    for gates in (None, ones):
        logits, feats = gc.forward(gc.state, x, gates)
        chex.assert_trees_all_equal(logits, model(x))
    chex.assert_shape(feats["blocks/1/mlp/act"], (B, 16, 16))
    # closing hidden channel c of block 0 for all tokens == deleting row c of its fc2
    c = 6
    gates = {**ones, "blocks/0/mlp/act": ones["blocks/0/mlp/act"].at[:, c].set(0.0)}
    cut = nnx.clone(model)
    cut.blocks[0].mlp.fc2.kernel.value = cut.blocks[0].mlp.fc2.kernel.value.at[c].set(0.0)
    logits = jax.jit(gc.forward)(gc.state, x, gates)[0]
    chex.assert_trees_all_close(logits, cut(x), atol=1e-5)
    assert not jnp.allclose(logits, model(x))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(K)(jnp.mean(x, axis=(1, 2)))


def test_linen_identity_and_gating():
    module, x = LinenCNN(), images(2)
    variables = module.init(jax.random.key(0), x, train=False)
    run = lambda m, v, x: m.apply(v, x, train=False)  # noqa: E731
    sites = list_sites(module, x, variables=variables, call=run)
    assert sites == {
        "Conv_0": (B, 16, 16, 8),
        "BatchNorm_0": (B, 16, 16, 8),
        "Conv_1": (B, 16, 16, 16),
        "Dense_0": (B, K),
    }
    gc = attach(module, "Conv_*", example_input=x, variables=variables, call=run)
    assert gc.site_channels == {"Conv_0": 8, "Conv_1": 16}
    want = run(module, variables, x)
    ones = {s: jnp.ones((B, c)) for s, c in gc.site_channels.items()}
    for gates in (None, ones):
        chex.assert_trees_all_equal(gc.forward(gc.state, x, gates)[0], want)
    # closing Conv_1's channel c == zeroing its kernel and bias there
    c = 2
    gates = {**ones, "Conv_1": ones["Conv_1"].at[:, c].set(0.0)}
    params = jax.tree.map(lambda a: a, variables["params"])
    params["Conv_1"]["kernel"] = params["Conv_1"]["kernel"].at[..., c].set(0.0)
    params["Conv_1"]["bias"] = params["Conv_1"]["bias"].at[c].set(0.0)
    logits, feats = jax.jit(gc.forward)(gc.state, x, gates)
    chex.assert_trees_all_close(logits, run(module, {**variables, "params": params}, x), atol=1e-5)
    chex.assert_shape(feats["Conv_0"], (B, 16, 16, 8))


class Twice(nnx.Module):
    def __init__(self, rngs):
        self.shared = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, K, rngs=rngs)

    def __call__(self, x):
        return self.head(self.shared(self.shared(x)))


def test_errors(cnn):
    model, x = cnn[0], images()
    with pytest.raises(ValueError, match=r"'blocks/\*' matches no submodule; available: .*conv1"):
        attach(model, "blocks/*", example_input=x)
    with pytest.raises(ValueError, match="'shared' was called twice"):
        attach(Twice(nnx.Rngs(0)), "shared", example_input=jnp.ones((B, 4)))
    gc = attach(model, "conv1", example_input=x)
    with pytest.raises(ValueError, match=r"gates\['conv1'\] has shape \(4, 3\), expected \(4, 8\)"):
        gc.forward(gc.state, x, {"conv1": jnp.ones((B, 3))})
    with pytest.raises(ValueError, match="unknown sites"):
        gc.forward(gc.state, x, {"bn9": jnp.ones((B, 8))})


def test_list_sites(cnn):
    sites = list_sites(cnn[0], images())
    assert list(sites) == ["conv1", "bn1", "act", "conv2", "bn2", "drop", "head"]
    assert sites["conv2"] == (B, 16, 16, 16) and sites["head"] == (B, K)
    assert list_sites(cnn[0])["bn2"] is None


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class Stacked(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, layer):
            return layer(h)

        return step(x, self.layers)


def test_site_inside_scan_errors():
    model = Stacked(nnx.Rngs(0))
    assert list_sites(model, jnp.ones((B, 4)))["layers/lin"] == (B, 4)  # one step's shape
    with pytest.raises(ValueError, match="'layers/lin' runs inside an NNX transform"):
        attach(model, "layers/lin", example_input=jnp.ones((B, 4)))
