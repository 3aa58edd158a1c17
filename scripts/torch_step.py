"""Our classifier train step against PyTorch's, side by side on this machine's CPU.

    .venv/bin/python scripts/torch_step.py                    # 2 host devices (the default run's)
    .venv/bin/python scripts/torch_step.py --devices=1        # one device, XLA's intra-op threads
    XLA_FLAGS=... .venv/bin/python scripts/torch_step.py      # any XLA CPU flag under test

The same VGG (configs/default.py: 3x3 conv, no bias, BatchNorm, ReLU, 2x2 max-pool between
stages, global average pool, dense), the same batch of random 28x28x1 images, AdamW behind
global-norm clipping, cross-entropy, at `--batch` images per step. The two steps are timed
round-robin (`tools/bench_train.measure_interleaved`), so a change of load falls on both and
their ratio holds; throughput is from the minimum over `--repeats` calls, the median beside it.
PyTorch is used only if it is installed (`pip install torch`); it is never a dependency.
Prints one JSON object: steps/s of each, the ratio ours / PyTorch's, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="XLA host devices of the mesh")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: cores)")
    parser.add_argument("--channels_last", action="store_true", help="PyTorch NHWC memory")
    return parser.parse_args()


def torch_vgg(torch, widths, in_channels, num_classes):
    """configs/default.py's VGG in PyTorch (BatchNorm momentum 0.1 = Flax's 0.9)."""
    nn = torch.nn
    layers, cin, size = [], in_channels, 28
    for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def torch_step_fn(torch, config, images_BxHxWxC, labels_B, threads, channels_last):
    """One PyTorch train step as a call (returns the loss as a float: the step has ended)."""
    if threads:
        torch.set_num_threads(threads)
    c = config.classifier
    model = torch_vgg(torch, tuple(c.widths), images_BxHxWxC.shape[-1], 10)
    x = torch.from_numpy(images_BxHxWxC.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels_B.astype("int64"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        opt.step()
        return loss.item()

    return step


def main():
    args = _args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import numpy as np

    from configs import default
    from gencnp_jax.context import loading
    from gencnp_jax.io import sharding
    from gencnp_jax.tools import bench, bench_train
    from gencnp_jax.train import classifier as train_classifier

    config = default.get_config()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)

    mesh = sharding.make_mesh(args.devices)
    model = loading.new_classifier(config, 10, 1)
    graphdef, tx, state = train_classifier.init_state(config, model, 10_000)
    bound = train_classifier.bound_step(graphdef, tx)
    placed_images, placed_labels = sharding.shard_batch(mesh, images, labels)
    batch = {"images": placed_images, "labels": placed_labels}
    ours = bench_train.RepeatedStep(bound, sharding.replicate(mesh, state), batch)
    calls = {"jax": (ours, bound.jitted)}
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed: timing ours alone", file=sys.stderr)
    if torch is not None:
        step = torch_step_fn(torch, config, images, labels, args.threads, args.channels_last)
        calls["torch"] = (step, None)
    timed = bench_train.measure_interleaved(calls, args.repeats)
    out = {
        "batch": args.batch,
        "devices": args.devices,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": bench.describe_machine(mesh, args.batch, args.repeats),
    }
    for name, timing in timed.items():
        timing = bench_train.per_step(timing)
        out[name] = {k: v for k, v in timing.items() if k != "seconds"}
    if torch is not None:
        out["torch"].update(version=torch.__version__, threads=torch.get_num_threads())
        out["torch"]["channels_last"] = args.channels_last
        out["ratio_jax_over_torch"] = (
            out["jax"]["steps_per_second"] / out["torch"]["steps_per_second"]
        )
        out["median_ratio_jax_over_torch"] = (
            out["jax"]["median_steps_per_second"] / out["torch"]["median_steps_per_second"]
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
