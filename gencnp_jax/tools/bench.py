"""Throughput of explaining and training on the trained models of a workdir (`--mode=bench`).

Writes `WORKDIR/bench.json` and prints a table: images/s of the classifier forward, GEN-CNP,
class-pathway transfer, CDRP and NeuronMCT; train steps/s per device count; peak memory.
"""

from __future__ import annotations

import os
import platform
import resource
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import psutil

from gencnp_jax.context import inputs, loading, user_model
from gencnp_jax.eval import baselines
from gencnp_jax.io import sharding, writers
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import class_bank as bank_lib
from gencnp_jax.method import evidence, explain
from gencnp_jax.models import daq
from gencnp_jax.stages import build_bank, evaluate, validation
from gencnp_jax.tools import bench_train

measure = bench_train.measure  # the timing rule of every number here
_per_image = bench_train.per_image

INFERENCE = (
    "forward",
    "forward/again",
    "forward_unwrapped",
    "forward_features",
    "gencnp",
    "transfer",
    "cdrp",
    "neuron_mct",
)
LABELS = {
    "forward": "classifier forward",
    "forward/again": "  same program, timed again",
    "forward_unwrapped": "  same, user's model unwrapped",
    "forward_features": "  same, logits and features",
    "gencnp": "GEN-CNP explanation",
    "transfer": "class-pathway transfer",
    "cdrp": "CDRP",
    "neuron_mct": "NeuronMCT",
    "gencnp/clean_pass": "  what it reads (forward; + backward: first-order)",
    "gencnp/generator": "  generator + DAQ",
    "gencnp/gated_pass": "  gated pass",
}


def _batch(config, batch_size: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    test = inputs.load_data(config, "test")
    n = len(test.labels)
    if n < batch_size:
        notes.append(f"the test split holds {n} images: the batch of {batch_size} repeats them")
    idx = np.arange(batch_size) % n
    return inputs.normalize(config, test.images[idx]), np.asarray(test.labels[idx], np.int32)


SLOW = ("cdrp",)  # timed min(repeats, SLOW_REPEATS) times: one call is seconds long
SLOW_REPEATS = 3
# The plain forward is timed as two interleaved series of the same program: their minimums
# must agree within this, or the machine's load moved the numbers. ("logits and features" is
# another program, which also writes the site features out: no check of noise.)
FORWARD_AGREEMENT = 0.15


def _inference(models: bench_train.Models, config, mesh, repeats: int, bank) -> dict:
    """(a) forward, (b) GEN-CNP (+ its three stages), (c) transfer, (d) CDRP, (e) NeuronMCT,
    timed round-robin (`bench_train.measure_interleaved`) so their ratios hold under load."""
    batch = models.images.shape[0]
    generator, classifier = sharding.replicate(mesh, (models.generator, models.classifier))
    images, labels = sharding.shard_batch(mesh, models.images, models.labels)
    settings = models.settings
    cdrp_settings = evaluate.settings_from_config(config).cdrp
    fns = {
        "forward": jax.jit(lambda c, x: c.logits(x)),
        "forward_features": jax.jit(lambda c, x: c.classify(x)),
        "gencnp": explain.jit_explain,
        "cdrp": jax.jit(lambda c, x: baselines.cdrp(c, x, cdrp_settings)),
        "neuron_mct": jax.jit(lambda c, x: baselines.neuron_mct(c, x, density=0.5)),
        # where GEN-CNP's time goes: the three parts of `explain.explain`, each jitted alone
        # (the clean pass includes the backward pass of a generator that reads gradients)
        "gencnp/clean_pass": jax.jit(lambda g, c, x: evidence.read(c, x, g.reads_gradients)[1:]),
        "gencnp/generator": jax.jit(lambda g, read, st: g.pathway(read[0], st, read[1])[1]),
        "gencnp/gated_pass": jax.jit(lambda c, x, gates: c.logits(x, gates)),
    }
    fns["forward/again"] = fns["forward"]  # the same compiled program, a second series
    read = fns["gencnp/clean_pass"](generator, classifier, images)
    gates = fns["gencnp/generator"](generator, read, settings)
    calls = {
        "forward": lambda: fns["forward"](classifier, images),
        "forward/again": lambda: fns["forward"](classifier, images),
        "forward_features": lambda: fns["forward_features"](classifier, images),
        "gencnp": lambda: fns["gencnp"](generator, classifier, images, settings),
        "neuron_mct": lambda: fns["neuron_mct"](classifier, images),
        "gencnp/clean_pass": lambda: fns["gencnp/clean_pass"](generator, classifier, images),
        "gencnp/generator": lambda: fns["gencnp/generator"](generator, read, settings),
        "gencnp/gated_pass": lambda: fns["gencnp/gated_pass"](classifier, images, gates),
    }
    unwrapped = user_model.unwrapped_forward(config, classifier.graphdef)
    if unwrapped is not None:  # a user's model: its own forward, without `attach`
        fns["forward_unwrapped"] = jax.jit(unwrapped)
        calls["forward_unwrapped"] = lambda: fns["forward_unwrapped"](classifier.state, images)
    if bank is not None:
        fns["transfer"] = jax.jit(_transfer_fn(config.bank.class_source))
        bank_dev = sharding.replicate(mesh, bank)
        calls["transfer"] = lambda: fns["transfer"](bank_dev, classifier, images, labels)
    timed = bench_train.measure_interleaved(
        {name: (call, fns[name]) for name, call in calls.items()}, repeats
    )
    slow = {name: (lambda n=name: fns[n](classifier, images), fns[name]) for name in SLOW}
    timed.update(bench_train.measure_interleaved(slow, min(repeats, SLOW_REPEATS)))
    order = (*INFERENCE, "gencnp/clean_pass", "gencnp/generator", "gencnp/gated_pass")
    results = {name: _per_image(timed[name], batch) for name in order if name in timed}
    results["cdrp"]["steps"] = int(cdrp_settings.steps)
    results["neuron_mct"]["density"] = 0.5
    if "transfer" in results:
        results["transfer"]["class_source"] = config.bank.class_source
    return results


def _transfer_fn(class_source: str):
    """Class-pathway transfer: the class (H's prediction or the label), its bank gates, and
    the gated pass. No generator call."""

    def fn(bank, classifier, images, labels):
        classes_B = labels if class_source == "label" else jnp.argmax(classifier.logits(images), -1)
        return classifier.logits(images, bank_lib.transfer(bank, classes_B))

    return fn


def _load_bank(config, workdir: str, classifier, notes: list[str]):
    """The class-pathway bank of `workdir` (a pytree), or None with a note if there is none."""
    try:
        return build_bank.load_bank(config, workdir, classifier)
    except workdir_lib.StageOrderError:
        notes.append(
            "transfer skipped: no class-pathway bank in the workdir (run --mode=build_bank first)"
        )
        return None


def _memory() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    out = {"peak_host_rss_mb": rss_mb}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_memory_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(mesh, batch: int, repeats: int) -> dict:
    """The machine: devices, CPU, cores, memory, the load while measuring, the versions."""
    device = jax.devices()[0]
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "mesh_devices": mesh.size,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "batch_size": batch,
        "repeats": repeats,
    }


def bench(config, workdir: str) -> dict:
    """Measures everything on the trained classifier and generator of `workdir`.

    Each number comes from `config.bench.repeats` timed calls (CDRP: at most `SLOW_REPEATS`)
    on a batch of `config.bench.batch_size` real test images, after warm-up (compilation
    excluded), with `jax.block_until_ready`, the calls timed round-robin; throughputs and
    ratios use the minimum time (the median is reported beside it). Inference and the
    headline train steps run on the config's mesh (`config.num_devices`, 0 = all); `scaling`
    repeats the train steps and GEN-CNP over one device and over all of them.

    Returns:
      The dict written to `WORKDIR/bench.json`: `environment`, `inference` (images/s per
      method), `ratios` (`gencnp_vs_forward` = GEN-CNP's time per image / the forward's;
      `cdrp_vs_gencnp` = CDRP's / GEN-CNP's), `train` (steps/s), `scaling`, `memory`, `notes`.
    """
    b = config.bench
    repeats, batch = int(b.repeats), int(b.batch_size)
    mesh = inputs.make_mesh(config)
    if batch % mesh.size:
        raise validation.ConfigError(
            f"config.bench.batch_size={batch} does not split over {mesh.size} devices: choose "
            f"a multiple of {mesh.size}"
        )
    notes: list[str] = []
    generator, classifier, _ = loading.load_generator(
        config, workdir, loading.load_classifier(config, workdir)
    )
    images, labels = _batch(config, batch, notes)
    settings = daq.Settings.create(config.generator.daq.temperature, config.generator.daq.sigma)
    models = bench_train.Models(classifier, generator, settings, images, labels)
    bank = _load_bank(config, workdir, classifier, notes)

    inference = _inference(models, config, mesh, repeats, bank)
    per_image = lambda k: inference[k]["seconds_per_image"]
    ratios = {
        "gencnp_vs_forward": per_image("gencnp") / per_image("forward"),
        "cdrp_vs_gencnp": per_image("cdrp") / per_image("gencnp"),
        "clean_pass_vs_forward": per_image("gencnp/clean_pass") / per_image("forward"),
        "features_vs_forward": per_image("forward_features") / per_image("forward"),
        "forward_again_vs_forward": per_image("forward/again") / per_image("forward"),
    }
    if abs(ratios["forward_again_vs_forward"] - 1.0) > FORWARD_AGREEMENT:
        notes.append(
            f"two timings of the same forward differ by "
            f"{abs(ratios['forward_again_vs_forward'] - 1.0):.0%}, more than "
            f"{FORWARD_AGREEMENT:.0%}: the machine was busy, rerun on a quiet one"
        )
    if "transfer" in inference:
        ratios["transfer_vs_forward"] = per_image("transfer") / per_image("forward")
    states = bench_train.train_states(models, config)
    train = bench_train.train(models, config, mesh, repeats, states)
    headline = bench_train.Headline(mesh, train, inference["gencnp"])
    scaling = bench_train.scaling(models, config, headline, repeats, states, notes)
    result = {
        "environment": describe_machine(mesh, batch, repeats),
        "inference": inference,
        "ratios": ratios,
        "train": train,
        "scaling": scaling,
        "memory": _memory(),
        "notes": notes,
    }
    writers.write_json(workdir_lib.done_file("bench", workdir), result)
    if jax.process_index() == 0:
        print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    """The bench result as a plain-text table."""
    env = result["environment"]
    lines = [
        f"bench: {env['device_kind']} ({env['platform']}) x{env['mesh_devices']} of "
        f"{env['device_count']}, {env['process_count']} process(es), jax "
        f"{env['jax_version']}, batch {env['batch_size']}, best of {env['repeats']}; "
        f"{env['cpu']} ({env['cpu_cores']} cores, load {env['load_average_1min']})",
        f"{'what':34s} {'images/s':>12s} {'ms/batch':>10s} {'median ms':>10s} {'1st call s':>11s}",
    ]
    for name, r in result["inference"].items():
        extra = f" ({r['steps']} steps)" if "steps" in r else ""
        lines.append(
            f"{LABELS[name] + extra:34s} {r['images_per_second']:12.1f} "
            f"{1e3 * r['min_seconds']:10.2f} {1e3 * r['median_seconds']:10.2f} "
            f"{r['first_call_seconds']:11.2f}"
        )
    lines.append(f"{'train step':34s} {'steps/s':>12s} {'ms/step':>10s} {'1st call s':>11s}")
    for name, r in result["train"].items():
        lines.append(
            f"{name:34s} {r['steps_per_second']:12.2f} "
            f"{1e3 * r['min_seconds']:10.2f} {1e3 * r['median_seconds']:10.2f} "
            f"{r['first_call_seconds']:11.2f}"
        )
    lines.append(
        f"{'devices':8s} {'classifier steps/s':>19s} {'generator steps/s':>18s} "
        f"{'GEN-CNP images/s':>17s}"
    )
    for n, r in result["scaling"].items():
        if "skipped" in r:
            lines.append(f"{n:8s} skipped: {r['skipped']}")
        else:
            lines.append(
                f"{n:8s} {r['classifier_steps_per_second']:19.2f} "
                f"{r['generator_steps_per_second']:18.2f} "
                f"{r['gencnp_images_per_second']:17.1f}"
            )
    lines.append("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in result["ratios"].items()))
    lines.append("memory: " + ", ".join(f"{k} = {v:.0f}" for k, v in result["memory"].items()))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
