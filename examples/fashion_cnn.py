"""A small Flax NNX classifier that knows nothing of gencnp_jax, and how to train it.

It stands for "your own model": `configs/fashion_cnn.py` explains it end to end through
``config.classifier.factory = "examples.fashion_cnn:build"`` and the weights this script saves:

    python -m examples.fashion_cnn --out=runs/fashion_cnn_weights.npz --steps=600
    python launch.py --config=configs/fashion_cnn.py --workdir=runs/fashion_cnn --mode=all

Its gate sites are the ReLUs of its three blocks: ``blocks/*/layers/2``
(`gencnp_jax.list_sites(build(), x)` lists every candidate).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class FashionCNN(nnx.Module):
    """Three conv-BatchNorm-ReLU blocks (the 2nd and 3rd strided), global average, dropout,
    a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, rngs: nnx.Rngs):
        widths = (16, 32, 64)
        blocks, cin = [], in_channels
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            conv = nnx.Conv(cin, width, (3, 3), strides=stride, use_bias=False, rngs=rngs)
            blocks.append(
                nnx.Sequential(conv, nnx.BatchNorm(width, momentum=0.9, rngs=rngs), nnx.relu)
            )
            cin = width
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(jnp.mean(x, axis=(1, 2))))


def build(num_classes: int = 10, in_channels: int = 1, seed: int = 0) -> FashionCNN:
    """The factory `config.classifier.factory` names: a fresh model (weights come later)."""
    return FashionCNN(num_classes, in_channels, rngs=nnx.Rngs(seed))


def train(model, images_f32, labels, steps: int, batch_size: int = 128, seed: int = 0):
    """Plain Adam on cross-entropy; returns the model (trained in place)."""
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(labels), batch_size)
        step(model, optimizer, jnp.asarray(images_f32[idx]), jnp.asarray(labels[idx]))
    model.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fashion_cnn_weights.npz")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    import gencnp_jax
    from gencnp_jax.io import data

    train_split = data.load_split("fashion_mnist", "train", "~/tensorflow_datasets")
    test_split = data.load_split("fashion_mnist", "test", "~/tensorflow_datasets")
    norm = lambda x: data.normalize(x, "fashion_mnist")
    model = train(build(), norm(train_split.images), train_split.labels, args.steps)
    pred = np.concatenate([
        np.asarray(jax.jit(model.__call__)(norm(test_split.images[i : i + 1000])).argmax(-1))
        for i in range(0, len(test_split.labels), 1000)
    ])  # fmt: skip
    print(f"test accuracy {np.mean(pred == test_split.labels):.4f}")
    print("saved", gencnp_jax.save_weights(model, args.out))


if __name__ == "__main__":
    main()
