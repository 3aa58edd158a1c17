"""Data parallelism: the classifier and generator train steps on a 2-device CPU mesh give the
1-device result (to float tolerance), with batches split and parameters replicated.

The mesh needs forced host devices, which must be set before JAX starts: the work runs in
one subprocess (`_SCRIPT`) that saves every leaf after N steps on each mesh.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx

assert jax.device_count() == 2, jax.devices()
from configs import tiny
from gencnp_jax.models import classifiers
from gencnp_jax.io import sharding
from gencnp_jax.train import classifier as train_classifier
from gencnp_jax.train import generator as train_generator
from gencnp_jax.train import loop as train_loop
from gencnp_jax.models.frozen import FrozenClassifier

out_path, steps = sys.argv[1], int(sys.argv[2])
config = tiny.get_config()
# The capped top-1 hinge sits exactly at its kink while the pathway equals the full model
# (margin min(m, full margin) minus the pathway's margin = 0), so float reassociation across
# devices decides whether it is active: it is left out (weight 0: not built); every other
# term is compared as configured.
config.generator.loss.w_hinge = 0.0
batch = 8
rng = np.random.default_rng(0)
images = rng.normal(size=(steps, batch, 28, 28, 1)).astype(np.float32)
labels = rng.integers(0, 10, (steps, batch)).astype(np.int32)
model = classifiers.make_classifier("vgg", (8, 16), 10, 1, 1, seed=0)
site_channels = dict(model.site_channels)
tx = train_classifier.make_optimizer(1e-2, 1e-4, 1, 100, 1.0)
graphdef, cls_state0 = train_loop.TrainState.create(model, tx)
classifier = FrozenClassifier(graphdef, nnx.state(model), site_channels, 10)
gen_graphdef, gen_tx, gen0 = train_generator.init_state(config, classifier)
hp, weights = train_generator.hparams_from_config(config.generator)

results = {"classifier_init": {"params": cls_state0.params},
           "generator_init": {"params": gen0.params}}
info = {}
for n in (1, 2):
    mesh = sharding.make_mesh(n)
    step_fn = train_classifier.make_train_step(graphdef, tx)
    state = sharding.replicate(mesh, jax.tree.map(jnp.copy, cls_state0))
    losses = []
    for i in range(steps):
        x, y = sharding.shard_batch(mesh, images[i], labels[i])
        state, metrics = step_fn(state, {"images": x, "labels": y})
        losses.append(metrics["train/loss"])
    info[f"classifier_{n}"] = {
        "image_shards": sorted(s.data.shape[0] for s in x.addressable_shards),
        "state_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(state)),
        "state_devices": len(jax.tree.leaves(state)[0].sharding.device_set),
    }
    results[f"classifier_{n}"] = sharding.to_host(
        {"params": state.params, "rest": state.rest, "loss": jnp.stack(losses)})

    gen_step = train_generator.make_train_step(gen_graphdef, gen_tx, weights.active())
    gen, cls_n = sharding.replicate(mesh, (jax.tree.map(jnp.copy, gen0), classifier))
    hp_n, weights_n = sharding.replicate(mesh, (hp, weights))
    totals = []
    for i in range(steps):
        x = sharding.shard_batch(mesh, images[i])
        gen, out = gen_step(gen, x, jnp.int32(i), cls_n, weights_n, hp_n)
        totals.append(out["loss/total"])
    info[f"generator_{n}"] = {
        "gen_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(gen)),
        "gen_devices": len(jax.tree.leaves(gen)[0].sharding.device_set),
    }
    results[f"generator_{n}"] = sharding.to_host(
        {"params": gen.params, "loss": jnp.stack(totals)})

# Several gated passes in one forward (`logits_of_passes`), on the 2-device mesh.
mesh = sharding.make_mesh(2)
cls_2 = sharding.replicate(mesh, classifier)
x = sharding.shard_batch(mesh, images[0])
gates = {s: sharding.shard_batch(mesh, rng.integers(0, 2, (batch, c)).astype(np.float32))
         for s, c in site_channels.items()}
passes = jax.jit(lambda c, x, g: c.logits_of_passes([(x, g), (-x, g)]))
hlo = passes.lower(cls_2, x, gates).compile().as_text()
info["passes_collectives"] = sorted(
    op for op in ("all-to-all", "all-gather", "collective-permute") if f" {op}(" in hlo)
alone = jax.jit(lambda c, x, g: c.logits(x, g))
info["passes_max_diff"] = max(
    float(jnp.abs(got - alone(cls_2, xx, gates)).max())
    for got, xx in zip(passes(cls_2, x, gates), (x, -x)))

flat = {}
for name, tree in results.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path).removesuffix(".value")  # a Variable's or its value's
        flat[f"{name}|{key}"] = np.asarray(leaf)
np.savez(out_path + ".npz", **flat)
with open(out_path + ".json", "w") as f:
    json.dump(info, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multidevice") / "result")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    cache_dir = jax.config.jax_compilation_cache_dir  # share the suite's XLA cache, if any
    if cache_dir and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, out, str(STEPS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out + ".npz") as data:
        arrays = dict(data)
    with open(out + ".json") as f:
        info = json.load(f)
    return arrays, info


def _run(arrays, run):
    """The leaves of one run (e.g. ``classifier_2``) by their tree path."""
    return {k.split("|")[1]: v for k, v in arrays.items() if k.split("|")[0] == run}


def _compare(arrays, name, rtol, atol):
    one, two = _run(arrays, f"{name}_1"), _run(arrays, f"{name}_2")
    assert one and set(one) == set(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=rtol, atol=atol, err_msg=key)
    return one, two


def _assert_moved(arrays, name, one, still=()):
    """Training moved the parameters, so agreeing after N steps is not agreeing at init
    (leaves whose path holds one of `still` are left out)."""
    init = _run(arrays, f"{name}_init")
    assert init and set(init) <= set(one)
    init = {k: v for k, v in init.items() if not any(s in k for s in still)}
    moved = [np.max(np.abs(one[k] - v)) > 1e-4 for k, v in init.items()]
    assert np.mean(moved) > 0.9, f"{sum(moved)} of {len(moved)} {name} leaves moved"


def test_classifier_step_on_two_devices_matches_one(runs):
    arrays, info = runs
    assert info["classifier_1"]["image_shards"] == [8]
    assert info["classifier_2"]["image_shards"] == [4, 4]  # the batch is split...
    assert info["classifier_2"]["state_replicated"]  # ...the state is replicated
    assert info["classifier_2"]["state_devices"] == 2
    one, _ = _compare(arrays, "classifier", rtol=1e-4, atol=1e-5)
    _assert_moved(arrays, "classifier", one)
    loss = one["['loss']"]
    assert np.all(np.isfinite(loss)) and loss.shape == (STEPS,)


def test_generator_step_on_two_devices_matches_one(runs):
    arrays, info = runs
    assert info["generator_2"]["gen_replicated"] and info["generator_2"]["gen_devices"] == 2
    one, _ = _compare(arrays, "generator", rtol=1e-4, atol=1e-5)
    # the rank head learns from PIO targets only, and these steps have none
    _assert_moved(arrays, "generator", one, still=("rank_",))
    assert np.all(np.isfinite(one["['loss']"]))


def test_several_gated_passes_stay_on_their_devices(runs):
    """`FrozenClassifier.logits_of_passes` gives each pass's own logits, and on a batch-sharded
    mesh moves no rows between devices (a concatenation of the passes would)."""
    _, info = runs
    assert info["passes_collectives"] == []
    assert info["passes_max_diff"] < 1e-5
