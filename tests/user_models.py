"""Models the library has never seen, for the "bring your own model" tests: factories as a
user writes them (`config.classifier.factory = "user_models:mixer"`), on 28x28x1 images.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.act = nnx.gelu
        self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nnx.Module):
    def __init__(self, n, d, rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.tokens = nnx.Linear(n, n, rngs=rngs)
        self.mlp = MLP(d, 2 * d, rngs)

    def __call__(self, x):
        x = x + jnp.swapaxes(self.tokens(jnp.swapaxes(self.norm(x), 1, 2)), 1, 2)
        return x + self.mlp(x)


class Mixer(nnx.Module):
    """An MLP-Mixer: 16 tokens of 7x7 patches; its sites see (B, 16, D) activations."""

    def __init__(self, num_classes, rngs, d=16):
        self.embed = nnx.Linear(49, d, rngs=rngs)
        self.blocks = nnx.List([MixerBlock(16, d, rngs) for _ in range(2)])
        self.head = nnx.Linear(d, num_classes, rngs=rngs)

    def __call__(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(b, 16, 49)
        h = self.embed(patches)
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=1))


def mixer(num_classes=10):
    return Mixer(num_classes, nnx.Rngs(3))


class LinenCNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def linen_cnn(num_classes=10):
    module = LinenCNN(num_classes)
    return module, module.init(jax.random.key(4), jnp.zeros((1, 28, 28, 1)))


def not_a_model():
    return "a string"
