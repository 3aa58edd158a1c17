"""Tests for evaluate.py and eval_methods.py: the metric pass, the random baseline, and one
end-to-end run (build_bank, evaluate) on the session's trained tiny run (tests/conftest.py).
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.stages import build_bank, context, evaluate

METHODS = (
    "gencnp",
    "gencnp_transfer",
    "cdrp",
    "cdrp_matched",
    "neuron_mct",
    "neuron_intgrad",
    "random",
    "topk_activation",
)
METRICS = (
    "mIC",
    "mDC",
    "agreement",
    "density_mean",
    "density_std",
    "acIOU",
    "inter_class_iou",
    "necessity_drop",
    "deletion_auc",
    "insertion_auc",
    "leakage",
    "null_confidence",
    "seconds_per_image",
    "num_examples",
    "num_examples_auc",
)


@pytest.fixture(name="evaluated", scope="module")
def fixture_evaluated(tiny_config, generator_workdir, tmp_path_factory):
    """`(config, workdir, results)`: build_bank and evaluate on a copy of the session's trained
    tiny run, with the costly parts capped below the 40 examples evaluated."""
    workdir = str(tmp_path_factory.mktemp("evaluate"))
    for stage in ("classifier", "generator"):
        shutil.copytree(os.path.join(generator_workdir, stage), os.path.join(workdir, stage))
    config = copy.deepcopy(tiny_config)
    config.eval.update(
        max_examples=40, batch_size=16, cdrp_steps=2, intgrad_steps=2, auc_points=3
    )  # 40 = 16 + 16 + 8: the last batch is padded
    config.eval.cdrp_max_examples, config.eval.auc_max_examples = 20, 24
    config.eval.ablation_max_examples = 32
    build_bank.build_bank(config, workdir)
    return config, workdir, evaluate.evaluate(config, workdir)


def test_results_have_every_method_and_metric(evaluated):
    _, workdir, results = evaluated
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        on_disk = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert on_disk["split"] == "test" and on_disk["num_examples"] == 40
    names = [*METHODS, *(f"{m}_mean_ablation" for m in METHODS)]
    assert sorted(on_disk["methods"]) == sorted(names)
    for name in names:
        missing = [k for k in METRICS if on_disk["methods"][name].get(k) is None]
        assert not missing, f"{name} lacks {missing}"
    for name in ("gencnp_transfer", "gencnp_transfer_mean_ablation"):
        assert {"class_leakage", "other_class_drop"} <= set(on_disk["methods"][name])
    assert 0.0 <= on_disk["sanity_iou"] <= 1.0
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        table = f.read()
    assert all(f"| {name} |" in table for name in names)


def test_examples_per_method_follow_the_caps(evaluated):
    methods = evaluated[2]["methods"]
    assert methods["gencnp"]["num_examples"] == 40 and methods["gencnp"]["num_examples_auc"] == 24
    assert methods["cdrp"]["num_examples"] == methods["cdrp_matched"]["num_examples"] == 20
    assert methods["cdrp"]["num_examples_auc"] == 20
    assert methods["random_mean_ablation"]["num_examples"] == 32
    assert methods["random_mean_ablation"]["num_examples_auc"] == 24


def test_matched_baselines_follow_gencnp_density(evaluated):
    methods, site_density = evaluated[2]["methods"], evaluated[2]["site_density"]
    for site, d in site_density["gencnp"].items():
        np.testing.assert_allclose(site_density["random"][site], d, atol=1e-6)
    for name in ("neuron_mct", "topk_activation", "neuron_intgrad"):
        np.testing.assert_allclose(
            methods[name]["density_mean"], methods["gencnp"]["density_mean"], atol=1e-2
        )


def test_bank_of_the_trained_workdir(evaluated):
    config, workdir, _ = evaluated
    classifier = context.load_classifier(config, workdir)
    loaded = build_bank.load_bank(config, workdir, classifier)
    assert loaded.num_classes == 10 and int(loaded.counts.max()) <= config.bank.samples_per_class
    for site, m in loaded.masks.items():
        assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
        np.testing.assert_array_equal(m, np.asarray(loaded.freq[site]) >= 0.5)


def _tiny_classifier():
    model = classifiers.make_classifier("vgg", (4, 8), 10, 1)
    graphdef, state = classifiers.split(model)
    return graphdef, state, dict(model.site_channels)


def test_metric_pass_on_the_full_model_is_exact():
    graphdef, state, sites = _tiny_classifier()
    images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    classes_B = jnp.argmax(classifiers.forward(graphdef, state, images)[0], -1)
    ones = gates_lib.all_ones(sites, 8)
    zeros = {s: jnp.zeros((c,)) for s, c in sites.items()}
    valid_B = jnp.asarray([1.0] * 6 + [0.0] * 2)
    fn = eval_methods.make_metric_fn(graphdef, 3, with_auc=True)
    per, flat = fn(state, zeros, images, classes_B, valid_B, valid_B, ones, ones)
    mean = lambda k: float(jnp.sum(per[k][0] * per[k][1]) / jnp.sum(per[k][1]))
    assert mean("mIC") == 0.0 and mean("mDC") == 0.0 and mean("agreement") == 1.0
    assert mean("density") == 1.0 and flat.shape == (8, sum(sites.values()))
    assert 0.0 <= mean("deletion_auc") <= 1.0 and 0.0 <= mean("insertion_auc") <= 1.0


def test_random_method_keeps_the_requested_site_density():
    graphdef, state, sites = _tiny_classifier()
    methods = {
        m.name: m
        for m in eval_methods.make_methods(graphdef, graphdef, sites, eval_methods.Settings())
    }
    site_density = {s: jnp.asarray([0.25, 0.5, 0.75, 1.0]) for s in sites}
    batch = {"index": jnp.arange(4), "site_density": site_density}
    out = jax.jit(methods["random"].pathway_fn)({"key": jax.random.key(0)}, batch)
    for site, d_B in gates_lib.site_density(out["gates"]["random"]).items():
        np.testing.assert_allclose(d_B, site_density[site])
