"""The compiled cost of the pipeline's programs on the small configs, for docs/SCALE.md.

    python scripts/scale_probe.py [--config=configs/default.py] [--batch=128]

For each program (the classifier's forward and train step, the generator's train step, one
explanation, one PIO step), XLA's cost analysis (FLOPs, bytes accessed) and memory analysis
(arguments, temporaries) per image, from compiled programs on a fresh model: no data, no
training. Prints a JSON object; docs/SCALE.md scales these numbers to ImageNet.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _cost(jitted, *args) -> dict:
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", 0)),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)),
    }


def probe(config, batch: int) -> dict:
    from flax import nnx

    from gencnp_jax.context import loading
    from gencnp_jax.io import data
    from gencnp_jax.method import explain, objective, pio
    from gencnp_jax.models import daq
    from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
    from gencnp_jax.train import classifier as train_classifier
    from gencnp_jax.train import generator as train_generator
    from gencnp_jax.train import loop as train_loop
    from gencnp_jax.train import pio_targets

    hwc, k = data.dataset_info(config.data.dataset)
    model = loading.new_classifier(config, k, hwc[-1])
    graphdef, state = nnx.split(model)
    classifier = FrozenClassifier(graphdef, state, model.site_channels, k)
    fills = {s: jnp.zeros((c,)) for s, c in model.site_channels.items()}
    classifier = classifier.with_fills(fills)
    images = jnp.zeros((batch, *hwc), jnp.float32)
    labels = jnp.zeros((batch,), jnp.int32)
    out = {"batch": batch, "image_shape": list(hwc), "channels": classifier.num_neurons}
    out["classifier_params"] = int(
        sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    )
    out["forward"] = _cost(jax.jit(lambda c, x: c.logits(x)), classifier, images)
    tx = train_classifier.make_optimizer(1e-3, 1e-4, 10, 100, 1.0)
    cls_graphdef, cls_state = train_loop.TrainState.create(model, tx)
    step = train_classifier.make_train_step(cls_graphdef, tx)
    out["classifier_train_step"] = _cost(step, cls_state, {"images": images, "labels": labels})
    generator = loading.new_generator(config, model.site_channels, k)
    gen_graphdef, gen_tx, gen_state = train_generator.init_state(config, classifier, generator)
    hp, weights = train_generator.hparams_from_config(config.generator)
    per_step = int(config.generator.pio.per_step)
    gen_batch = {
        "images": images,
        "target_masks": jnp.zeros((per_step, classifier.num_neurons)),
    }
    _, gen_batch["target_pools"], gen_batch["target_fo"] = objective.read(
        generator, classifier, images[:per_step]
    )
    gen_step = train_generator.make_train_step(gen_graphdef, gen_tx, weights.active())
    out["generator_train_step"] = _cost(
        gen_step, gen_state, gen_batch, jnp.int32(0), classifier, weights, hp
    )
    frozen_gen = FrozenGenerator(*nnx.split(generator))
    settings = daq.Settings.create(2.0, 2.0)
    out["explain"] = _cost(explain.jit_explain, frozen_gen, classifier, images, settings)
    one_step = pio_targets.hparams(config).replace(steps=jnp.int32(1))
    out["pio_one_step"] = _cost(jax.jit(pio.optimise_masks), classifier, images, one_step)
    for key in list(out):
        if isinstance(out[key], dict):
            out[key]["flops_per_image"] = out[key]["flops"] / batch
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    result = probe(config, args.batch)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
