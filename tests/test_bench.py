"""Tests for bench.py: `bench` on the tiny trained workdir writes every number, each positive,
and every jitted function it times compiles once. No timing assertions."""

import copy
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from gencnp_jax.stages import build_bank
from gencnp_jax.tools import bench
from gencnp_jax.tools.bench_train import measure_interleaved


def _numbers(tree, path=""):
    """Every int/float leaf of a nested dict/list, with its path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_measure_counts_compilations_and_takes_the_median():
    fn = jax.jit(lambda x: x * 2.0)
    x = jnp.ones((4,))
    out = bench.measure(lambda: fn(x), repeats=3, jitted=fn)
    assert out["retraces"] == 0
    y = jnp.ones((5,))
    shapes = iter([x, y, x, y, x, y, x])  # a new shape after the first call: one retrace
    assert bench.measure(lambda: fn(next(shapes)), repeats=3, jitted=fn)["retraces"] == 1
    assert len(out["seconds"]) == 3
    assert out["median_seconds"] == sorted(out["seconds"])[1]
    assert out["first_call_seconds"] > 0


def test_interleaved_timing_goes_round_robin():
    order = []
    calls = {name: (lambda n=name: order.append(n), None) for name in ("a", "b")}
    out = measure_interleaved(calls, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # first calls, then each repeat times both
    assert all(len(out[n]["seconds"]) == 3 for n in ("a", "b"))


@pytest.fixture(name="bench_workdir")
def fixture_bench_workdir(tiny_config, generator_workdir, tmp_path):
    """A copy of the trained tiny run, with a class-pathway bank when bank.py is there."""
    workdir = str(tmp_path / "run")
    shutil.copytree(generator_workdir, workdir)
    build_bank.build_bank(tiny_config, workdir)
    return workdir, True


def test_bench_writes_every_number(tiny_config, bench_workdir, capsys):
    workdir, has_bank = bench_workdir
    config = copy.deepcopy(tiny_config)
    config.bench.repeats = 2
    result = bench.bench(config, workdir)

    with open(os.path.join(workdir, "bench.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))  # what was returned is what was written
    assert set(saved) == {
        "environment",
        "inference",
        "ratios",
        "train",
        "scaling",
        "memory",
        "notes",
    }
    env = saved["environment"]
    assert env["batch_size"] == config.bench.batch_size and env["repeats"] == 2
    assert env["cpu_cores"] >= 1 and env["memory_gb"] > 0 and env["cpu"]
    assert env["device_count"] == jax.device_count() and env["jax_version"] == jax.__version__

    expected = {
        "forward",
        "forward/again",
        "forward_features",
        "gencnp",
        "cdrp",
        "neuron_mct",
        "gencnp/clean_pass",
        "gencnp/generator",
        "gencnp/gated_pass",
    } | ({"transfer"} if has_bank else set())
    assert set(saved["inference"]) == expected
    if not has_bank:
        assert any("transfer skipped" in n for n in saved["notes"])
    for name, r in saved["inference"].items():
        assert r["retraces"] == 0, name  # compile once: no retrace across repeats
        assert len(r["seconds"]) == 2
        assert r["min_seconds"] == min(r["seconds"]) <= r["median_seconds"]
        assert r["images_per_second"] == pytest.approx(config.bench.batch_size / r["min_seconds"])
    assert saved["inference"]["cdrp"]["steps"] == config.eval.cdrp_steps
    assert set(saved["ratios"]) >= {
        "gencnp_vs_forward", "cdrp_vs_gencnp", "clean_pass_vs_forward", "features_vs_forward",
        "forward_again_vs_forward",
    }  # fmt: skip
    per_image = lambda k: saved["inference"][k]["seconds_per_image"]
    assert saved["ratios"]["gencnp_vs_forward"] == pytest.approx(
        per_image("gencnp") / per_image("forward")
    )
    for name in ("classifier", "generator"):
        # the second call feeds the first call's outputs back: same shardings, no recompile
        assert saved["train"][name]["retraces"] == 0, name
    assert set(saved["scaling"]["1"]) == {
        "classifier_steps_per_second",
        "generator_steps_per_second",
        "gencnp_images_per_second",
    }
    assert set(saved["scaling"]) == {"1", str(jax.device_count())}
    assert saved["memory"]["peak_host_rss_mb"] > 0

    numbers = dict(_numbers(saved))
    assert len(numbers) > 40
    counts = ("retraces",)  # a count may be 0; every time and rate must be positive
    bad = {
        k: v
        for k, v in numbers.items()
        if not math.isfinite(v) or (v <= 0 and not k.endswith(counts))
    }
    assert not bad, f"non-positive or non-finite numbers: {bad}"

    table = capsys.readouterr().out
    assert "GEN-CNP explanation" in table and "generator" in table and "ratios:" in table
