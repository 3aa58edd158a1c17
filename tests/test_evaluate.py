"""Tests for evaluate.py, references.py and eval/methods.py: the metric pass, and one
end-to-end evaluation on the session's trained tiny run (tests/conftest.py) whose numbers must
obey what the evaluation promises: exact densities, choices read from validation images,
references that are the best of their candidates, scores under each ablation's own fills,
flags on a degenerate method.
"""

import copy
import importlib.util
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gencnp_jax.context import inputs, loading
from gencnp_jax.eval import baselines
from gencnp_jax.eval import methods as eval_methods
from gencnp_jax.method import evidence
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.stages import build_bank, evaluate, references

DENSITIES = (0.1, 0.3)
PER_INSTANCE = ("gencnp", "cdrp", "neuron_mct", "neuron_mct_signed", "neuron_intgrad")
PER_INSTANCE += ("topk_activation", "random")


@pytest.fixture(name="evaluated", scope="module")
def fixture_evaluated(tiny_config, generator_workdir, tmp_path_factory):
    """`(config, workdir, results)`: build_bank and evaluate on a copy of the session's
    trained tiny run, with the costly parts capped; CDRP forced degenerate (1 step keeps every
    channel)."""
    workdir = str(tmp_path_factory.mktemp("evaluate"))
    for stage in ("classifier", "generator"):
        shutil.copytree(os.path.join(generator_workdir, stage), os.path.join(workdir, stage))
    config = copy.deepcopy(tiny_config)
    config.eval.update(num_examples=40, batch_size=16, cdrp_steps=1, intgrad_steps=2)
    config.eval.update(auc_examples=24, densities=DENSITIES, control_examples=32, sanity_steps=2)
    config.eval.update(reference_examples=16, reference_steps=3)
    build_bank.build_bank(config, workdir)
    return config, workdir, evaluate.evaluate(config, workdir)


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
    assert mean("density") == 1.0
    # the complement of an all-open pathway closes everything: its drop is that of the null
    assert mean("necessity_drop") > 0.0
    np.testing.assert_array_equal(per["pathway_class"][0], np.asarray(classes_B, np.float32))


def test_every_method_at_a_fixed_density_keeps_exactly_round_d_n(evaluated):
    config, workdir, results = evaluated
    n = sum(loading.load_classifier(config, workdir).site_channels.values())
    for abl in ("mean", "zero"):
        for d in DENSITIES:
            for name, m in results["at_density"][abl][str(d)].items():
                assert m["density_mean"] == pytest.approx(round(d * n) / n, abs=1e-6), name


def test_matched_baselines_follow_gencnp_density(evaluated):
    own = evaluated[2]["own_density"]["mean"]
    for name in ("neuron_mct", "topk_activation", "neuron_intgrad", "random"):
        np.testing.assert_allclose(
            own[name]["density_mean"], own["gencnp"]["density_mean"], atol=1e-2
        )


def test_controls_take_the_source_that_is_better_on_validation(evaluated):
    results = evaluated[2]
    validation = results["validation"]
    assert validation["split"] == "validation" and results["split"] == "test"
    for kind, table in (("constant", "constant"), ("class_constant", "class_means")):
        for d in DENSITIES:
            row = validation["at_density"][str(d)]
            by_source = {src: row[f"{table}_{src}"]["mDC"] for src in evaluate.CONTROL_SOURCES}
            chosen = validation["control_source"][kind][str(d)]
            assert by_source[chosen] == min(by_source.values())
            test_row = results["at_density"]["mean"][str(d)]
            assert test_row[kind][f"{kind}_source"] == chosen
            assert test_row[kind]["mDC"] == test_row[f"{table}_{chosen}"]["mDC"]


def test_a_degenerate_method_is_flagged_in_results_table_and_warning(evaluated):
    config, workdir, results = evaluated
    assert results["own_density"]["mean"]["cdrp"]["density_mean"] >= 0.99  # 1 step: all open
    assert "cdrp" in results["flags"] and "keeps every channel" in results["flags"]["cdrp"][0]
    assert "gencnp" not in results["flags"]
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        table = f.read()
    assert "| cdrp ⚠ degenerate |" in table and "| gencnp |" in table


def test_flags_name_density_and_a_constant_class():
    rows = {
        "keeps_all": {"density_mean": 1.0, "top_pathway_class_share": 0.3},
        "keeps_none": {"density_mean": 0.0, "top_pathway_class_share": 0.3},
        "one_class": {"density_mean": 0.2, "top_pathway_class_share": 1.0},
        "fine": {"density_mean": 0.2, "top_pathway_class_share": 0.3},
    }
    flagged = evaluate.flags(rows, full_top_share=0.2)
    assert set(flagged) == {"keeps_all", "keeps_none", "one_class"}
    assert evaluate.flags(rows, full_top_share=1.0).keys() == {"keeps_all", "keeps_none"}


def test_each_ablation_scores_the_baselines_under_its_own_fills(evaluated):
    overlap = evaluated[2]["ablation_mask_iou"]
    for name in ("neuron_mct", "neuron_intgrad", "cdrp"):
        assert set(overlap[name]) == {str(d) for d in DENSITIES}
    # mean and zero ablation rank NeuronMCT's channels differently: its masks differ
    assert min(overlap["neuron_mct"].values()) < 1.0


def test_references_are_reported_beside_every_method(evaluated):
    results = evaluated[2]
    for d in DENSITIES:
        row = results["at_density"]["mean"][str(d)]
        assert {"class_reference", "instance_reference"} <= set(row)
        on_ref = results["on_reference_images"][str(d)]
        assert set(PER_INSTANCE) <= set(on_ref)
        # on the instance reference's images, it is never worse than the class reference
        assert on_ref["instance_reference"]["mDC"] <= on_ref["class_reference"]["mDC"] + 1e-9
        gains = results["specificity_gain"]
        assert set(gains["vs_class_reference"][str(d)]) >= set(PER_INSTANCE) - {"random"}
        assert set(gains["vs_own_class_means"][str(d)]) >= {"gencnp", "cdrp", "neuron_intgrad"}
    assert "zero" not in results["on_reference_images"]  # the headline ablation only


@pytest.fixture(name="reference_phase", scope="module")
def fixture_reference_phase(evaluated):
    """The reference phase of the evaluated run, rebuilt from its cache, with what it read."""
    config, workdir, _ = evaluated
    classifier = loading.load_classifier(config, workdir)
    generator, head, _ = loading.load_generator(config, workdir, classifier)
    run = evaluate.passes.Run(
        inputs.make_mesh(config), config.eval.batch_size, generator, classifier,
        lambda x: inputs.normalize(config, x), config.seed,
    )  # fmt: skip
    test = inputs.load_data(config, "test")
    val = inputs.load_data(config, "validation")
    subset = evaluate.make_subset(run, head, test.images[:40], "test", config.seed)
    validation = evaluate.make_subset(run, head, val.images[:40], "validation", config.seed + 1)
    found = references.searches(config, workdir, run, head, subset, DENSITIES)
    table = np.random.default_rng(0).normal(size=found.pio_class_means_KxN.shape)
    class_ref = references.class_reference(
        run, head, found, {"noise": table}, validation, DENSITIES
    )
    baseline = {
        "noise": np.random.default_rng(1).normal(size=(len(subset.classes), head.num_neurons))
    }
    instance_ref = references.instance_reference(run, head, found, subset, class_ref, baseline)
    return run, head, subset, validation, found, class_ref, instance_ref, baseline


def test_instance_reference_is_the_best_candidate_on_every_image(reference_phase):
    run, head, subset, _, found, class_ref, instance_ref, baseline = reference_phase
    n = len(found.pio_BxN)
    first = subset.first(n)
    for d in DENSITIES:
        drop_B = instance_ref.drop_B[str(d)]
        class_masks = class_ref.masks_KxN[str(d)][first.classes]
        class_drop = references.drops(run, head, first.images, first.full_logits, class_masks)
        np.testing.assert_allclose(instance_ref.class_drop_B[str(d)], class_drop, atol=1e-6)
        assert np.all(drop_B <= class_drop + 1e-7)  # never worse than its class's mask
        pio = baselines.top_k_at_density(jnp.asarray(found.pio_BxN), d, jax.random.key(9))
        pio_drop = references.drops(run, head, first.images, first.full_logits, np.asarray(pio))
        # never worse than its PIO ranking (with another tie key: ties in standardised logits
        # are rare, allow a few images)
        assert np.mean(drop_B <= pio_drop + 1e-7) >= 0.9
        again = references.drops(
            run, head, first.images, first.full_logits, instance_ref.masks_BxN[str(d)]
        )
        np.testing.assert_allclose(again, drop_B, atol=1e-6)  # its masks give its drops
        key = run.key("reference", "noise", str(d))
        noise = baselines.top_k_at_density(
            jnp.asarray(baseline["noise"][:n]), d, key, jnp.arange(n)
        )
        noise_drop = references.drops(run, head, first.images, first.full_logits, np.asarray(noise))
        assert np.all(drop_B <= noise_drop + 1e-7)  # never worse than a baseline's top-d
        assert sum(instance_ref.sources[str(d)].values()) == n


def test_class_reference_keeps_per_class_the_candidate_best_on_validation(reference_phase):
    run, head, _, validation, found, class_ref, *_ = reference_phase
    k = head.num_classes
    for d in DENSITIES:
        masks_KxN = class_ref.masks_KxN[str(d)]
        chosen = references.drops(
            run, head, validation.images, validation.full_logits, masks_KxN[validation.classes]
        )
        search_masks = np.asarray(
            baselines.top_k_at_density(
                jnp.asarray(found.class_search[str(d)]), d, run.key("reference", "search", d),
                jnp.arange(k),
            )
        )  # fmt: skip
        search = references.drops(
            run, head, validation.images, validation.full_logits,
            search_masks[validation.classes],
        )  # fmt: skip
        for c in np.unique(validation.classes):
            rows = validation.classes == c
            assert chosen[rows].mean() <= search[rows].mean() + 1e-7, (d, c)
        assert set(class_ref.sources[str(d)]) <= {"search", "pio_class_means", "noise"}


def test_validation_and_test_are_disjoint_from_training(tiny_config):
    train = inputs.load_data(tiny_config, "train")
    validation = inputs.load_data(tiny_config, "validation")
    assert len(validation.labels) == tiny_config.data.validation_size == 64
    assert len(train.labels) + len(validation.labels) == tiny_config.data.train_limit
    rows_train, rows_val = inputs.split_rows(tiny_config.data.train_limit, 64, tiny_config.seed)
    assert not set(rows_train) & set(rows_val)
    assert sorted([*rows_train, *rows_val]) == list(range(tiny_config.data.train_limit))
    seen = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in seen for img in validation.images)
    # another seed holds out other images; the same seed the same ones
    other = inputs.split_rows(tiny_config.data.train_limit, 64, tiny_config.seed + 1)[1]
    assert set(other) != set(rows_val)
    np.testing.assert_array_equal(inputs.split_rows(576, 64, tiny_config.seed)[1], rows_val)


def test_gencnp_ranks_by_its_rank_head_and_gates_by_its_gate_head(evaluated):
    config, workdir, _ = evaluated
    classifier = loading.load_classifier(config, workdir)
    generator, head, _ = loading.load_generator(config, workdir, classifier)
    images = jnp.asarray(inputs.normalize(config, inputs.load_data(config, "test").images[:8]))
    fns = eval_methods.make_score_fns(evaluate.settings_from_config(config))
    out = jax.jit(fns["gencnp"])(generator, head, images)
    assert generator.reads_gradients  # the default: first-order effects and a rank head
    _, features, fo = evidence.first_order_effects(head, images)
    ranking = gates_lib.flatten(generator.ranking(features, fo))
    gate_logits = gates_lib.flatten(generator.logits(features, fo))
    # ranked by logits (sigmoids saturate and tie), the rank head's, not the gate head's
    np.testing.assert_allclose(out["scores"], ranking, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ranking, gate_logits)
    np.testing.assert_array_equal(out["gates"], np.asarray(gate_logits) > 0.0)


def test_results_json_is_strict_json_with_the_split_of_every_block(evaluated):
    _, workdir, results = evaluated
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        saved = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert saved["split"] == "test" and saved["validation"]["split"] == "validation"
    assert saved["references"]["note"].startswith("yardsticks, not bounds")
    assert saved["config"]["validation_examples"] == 40


def test_validation_read_of_the_class_pathways_at_the_banks_own_count(evaluated):
    """scripts/validation_read.py (how `bank.threshold` is chosen): at the bank's own count its
    class pathways are the bank's, keeping a neuron only when more samples keep it never makes
    a pathway denser, and GEN-CNP's rows read its validation images only."""
    config, workdir, results = evaluated
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "validation_read.py")
    spec = importlib.util.spec_from_file_location("validation_read", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    classifier = loading.load_classifier(config, workdir)
    bank = build_bank.load_bank(config, workdir, classifier)
    j = int(np.max(np.asarray(bank.counts)))
    own = int(np.ceil(bank.threshold * j - 1e-6))  # the fewest samples that keep a neuron
    counts = sorted({1, own, j})
    out = script.read(workdir, config.eval.num_examples, counts, config)
    rows = out["bank"]
    chex.assert_trees_all_equal(
        rows[counts.index(own)]["pathways"], np.asarray(gates_lib.flatten(bank.masks))
    )
    densities = [r["density_mean"] for r in rows]
    assert densities == sorted(densities, reverse=True) and densities[0] > densities[-1]
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["class_leakage"] <= 1.0
    # the evaluation's own validation block reads the same images the same way
    block = results["validation"]
    assert out["num_examples"] == block["num_examples"]
    for d, row in out["at_density"].items():
        np.testing.assert_allclose(row["mDC"], block["at_density"][d]["gencnp"]["mDC"], rtol=1e-5)
    np.testing.assert_allclose(out["own"]["mDC"], block["own_density"]["gencnp"]["mDC"], rtol=1e-5)
