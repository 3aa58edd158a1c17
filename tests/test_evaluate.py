"""Tests for evaluate.py and eval/methods.py: the metric pass, and one end-to-end run
(build_bank, evaluate) on the session's trained tiny run (tests/conftest.py).
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.context import loading
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.stages import build_bank, evaluate

METHODS = (
    "gencnp",
    "gencnp_transfer",
    "cdrp",
    "neuron_mct",
    "neuron_mct_signed",
    "neuron_intgrad",
    "random",
    "topk_activation",
    "constant",
    "class_constant",
    "constant_gencnp_score",
    "constant_mct_score",
    "class_constant_gencnp_score",
    "class_constant_mct_score",
)
CLASS_LEVEL = ("gencnp_transfer", "random", "constant", "class_constant")
AT_DENSITY = ("mDC", "mIC", "agreement", "leakage", "density_mean", "acIOU", "inter_class_iou")
OWN = (*AT_DENSITY, "density_std", "necessity_drop", "null_confidence")
WITH_AUC = ("gencnp", "gencnp_transfer", "cdrp", "neuron_mct", "neuron_intgrad", "random")
DENSITIES = (0.1, 0.3)


@pytest.fixture(name="evaluated", scope="module")
def fixture_evaluated(tiny_config, generator_workdir, tmp_path_factory):
    """`(config, workdir, results)`: build_bank and evaluate on a copy of the session's trained
    tiny run, with the costly parts capped."""
    workdir = str(tmp_path_factory.mktemp("evaluate"))
    for stage in ("classifier", "generator"):
        shutil.copytree(os.path.join(generator_workdir, stage), os.path.join(workdir, stage))
    config = copy.deepcopy(tiny_config)
    config.eval.update(
        num_examples=40, batch_size=16, cdrp_steps=2, intgrad_steps=2
    )  # 40 = 16 + 16 + 8: the last batch is padded
    config.eval.update(auc_examples=24, densities=DENSITIES, control_examples=32, sanity_steps=2)
    build_bank.build_bank(config, workdir)
    return config, workdir, evaluate.evaluate(config, workdir)


def test_results_have_every_key(evaluated):
    _, workdir, results = evaluated
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        r = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert r["split"] == "test" and r["num_examples"] == 40
    assert r["config"]["ablations"] == ["mean", "zero"] and r["config"]["num_examples"] == 40
    for abl in ("mean", "zero"):
        assert sorted(r["at_density"][abl]) == sorted(str(d) for d in DENSITIES)
        for d, rows in r["at_density"][abl].items():
            assert set(METHODS) <= set(rows), d
            for name in METHODS:
                missing = [k for k in AT_DENSITY if rows[name].get(k) is None]
                assert not missing, f"{abl} {d} {name} lacks {missing}"
            for name in CLASS_LEVEL:
                assert rows[name].get("class_leakage") is not None, name
            assert rows["constant"]["constant_source"] in ("gencnp_score", "mct_score")
            assert set(r["specificity_gain"][abl][d]) == set(rows)
            assert r["specificity_gain"][abl][d]["class_constant"] in (1.0, None)
            assert set(r["random_reference"][abl][d]) == {"leakage", "class_leakage"}
        for name in METHODS:
            missing = [k for k in OWN if r["own_density"][abl][name].get(k) is None]
            assert not missing, f"own {abl} {name} lacks {missing}"
    for name in WITH_AUC:
        assert r["methods"][name]["deletion_auc"] is not None, name
        assert r["methods"][name]["num_examples_auc"] == 24
    assert set(METHODS) <= set(r["methods"])
    assert all(f"{m}_zero_ablation" in r["methods"] for m in METHODS)
    assert 0.0 <= r["null_confidence_full_model"] <= 1.0
    sanity = r["sanity"]
    assert 0.0 <= sanity["gencnp_retrained_iou"] <= 1.0
    assert 0.0 <= sanity["gencnp_features_iou"] <= 1.0
    for key in ("gencnp_retrained_iou_at_density", "neuron_mct_iou_at_density"):
        assert sorted(sanity[key]) == sorted(str(d) for d in DENSITIES)
    assert r["seconds"] > 0
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        table = f.read()
    assert all(f"## density {d}" in table for d in DENSITIES)
    assert all(f"| {name} |" in table for name in METHODS)


def test_every_method_at_a_fixed_density_keeps_exactly_round_d_n(evaluated):
    config, workdir, results = evaluated
    n = sum(loading.load_classifier(config, workdir).site_channels.values())
    for d in DENSITIES:
        for name, m in results["at_density"]["mean"][str(d)].items():
            assert m["density_mean"] == pytest.approx(round(d * n) / n, abs=1e-6), name


def test_matched_baselines_follow_gencnp_density(evaluated):
    own = evaluated[2]["own_density"]["mean"]
    for name in ("neuron_mct", "topk_activation", "neuron_intgrad", "random"):
        np.testing.assert_allclose(
            own[name]["density_mean"], own["gencnp"]["density_mean"], atol=1e-2
        )


def test_bank_of_the_trained_workdir(evaluated):
    config, workdir, _ = evaluated
    classifier = loading.load_classifier(config, workdir)
    loaded = build_bank.load_bank(config, workdir, classifier)
    assert loaded.num_classes == 10 and int(loaded.counts.max()) <= config.bank.samples_per_class
    for site, m in loaded.masks.items():
        assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
        np.testing.assert_array_equal(m, np.asarray(loaded.freq[site]) >= 0.5)


def _tiny_classifier():
    model = classifiers.make_classifier("vgg", (4, 8), 10, 1)
    graphdef, state = classifiers.split(model)
    sites = dict(model.site_channels)
    zeros = {s: jnp.zeros((c,)) for s, c in sites.items()}
    return FrozenClassifier(graphdef, state, sites, 10, zeros), sites


def test_metric_pass_on_the_full_model_is_exact():
    classifier, sites = _tiny_classifier()
    images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    classes_B = jnp.argmax(classifier.logits(images), -1)
    ones_BxN = jnp.ones((8, sum(sites.values())))
    per = eval_methods.make_metric_fn(extra=True)(classifier, images, classes_B, ones_BxN)
    mean = lambda k: float(jnp.sum(per[k][0] * per[k][1]) / jnp.sum(per[k][1]))
    assert mean("mIC") == 0.0 and mean("mDC") == 0.0 and mean("agreement") == 1.0
    assert mean("density") == 1.0 and "necessity_drop" in per and "null_confidence" in per
    aucs = eval_methods.make_auc_fn(3)(
        classifier, images, classes_B, ones_BxN, jnp.arange(8), jax.random.key(0)
    )
    assert all(bool(jnp.all((v >= 0) & (v <= 1))) for v in aucs.values())
    assert gates_lib.flatten(gates_lib.all_ones(sites, 8)).shape == ones_BxN.shape
