"""Metrics against hand-computed cases: confidence, density, IoU, leakage, transfer, AUC, sanity."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gencnp_jax.eval import accumulator as acc_lib
from gencnp_jax.eval import metrics, perturbation
from gencnp_jax.models import classifiers

LOG3 = math.log(3.0)
# row 0: Y = 0.5 -> O = 0.75 (increase); row 1: Y = 0.75 -> O = 0.5 (drop 1/3); row 2: padding
FULL = jnp.array([[0.0, 0.0], [LOG3, 0.0], [jnp.nan, 0.0]])
PATH = jnp.array([[LOG3, 0.0], [0.0, 0.0], [jnp.nan, 0.0]])
VALID2 = jnp.array([1, 1, 0])
GATES = {
    "a": jnp.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]),
    "b": jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
}


def test_confidence_metrics_hand_case_and_mask():
    assert float(metrics.mIC(FULL, PATH, valid_B=VALID2)) == pytest.approx(50.0)
    assert float(metrics.mDC(FULL, PATH, valid_B=VALID2)) == pytest.approx(100 / 6, rel=1e-5)
    only0 = jnp.array([1, 0, 0])
    assert float(metrics.mIC(FULL, PATH, valid_B=only0)) == pytest.approx(100.0)
    assert float(metrics.mDC(FULL, PATH, valid_B=only0)) == pytest.approx(0.0)
    # explained class given: class 1 in row 0 drops from 0.5 to 0.25
    c = jnp.array([1, 0, 0])
    assert float(metrics.mDC(FULL, PATH, c, only0)) == pytest.approx(50.0, rel=1e-5)
    assert float(metrics.agreement(FULL, PATH, VALID2)) == 1.0  # argmax ties go to class 0
    assert float(metrics.agreement(FULL, PATH[:, ::-1], VALID2)) == 0.5
    assert np.isnan(float(metrics.mIC(FULL, PATH, valid_B=jnp.zeros(3))))


def test_density_mean_std_per_site():
    # densities 3/6, 4/6 (and 2/6 for the padded row)
    assert float(metrics.density_mean(GATES, VALID2)) == pytest.approx(7 / 12)
    assert float(metrics.density_std(GATES, VALID2)) == pytest.approx(1 / 12, rel=1e-5)
    assert float(metrics.density_std(GATES, jnp.array([1, 0, 0]))) == pytest.approx(0.0)
    per_site = metrics.per_site_density(GATES, VALID2)
    assert float(per_site["a"]) == pytest.approx(0.5)
    assert float(per_site["b"]) == pytest.approx(5 / 8)
    empty = {"a": jnp.zeros((2, 3))}
    assert float(metrics.density_mean(empty)) == 0.0
    assert float(metrics.density_mean({"a": jnp.ones((2, 3))})) == 1.0


def test_iou_edge_cases_and_sanity_iou():
    rows = jnp.array([[0.0, 0, 0], [1, 1, 1], [1, 1, 0]])
    iou = metrics.iou_matrix(rows, rows)
    chex.assert_trees_all_close(iou[0], jnp.array([1.0, 0.0, 0.0]))  # empty vs empty := 1
    assert float(iou[1, 2]) == pytest.approx(2 / 3)
    assert float(metrics.sanity_iou(rows, rows)) == 1.0
    assert float(metrics.sanity_iou(rows[1:], 1.0 - rows[1:])) == 0.0
    assert float(metrics.sanity_iou(rows, rows[::-1], jnp.array([0, 1, 0]))) == 1.0


def _brute_iou(flat, classes, valid, same):
    f = np.asarray(flat, bool)
    per = {}
    for i, j in itertools.combinations(range(len(classes)), 2):
        if valid[i] and valid[j] and (classes[i] == classes[j]) == same:
            union = (f[i] | f[j]).sum()
            per.setdefault(classes[i] if same else 0, []).append(
                (f[i] & f[j]).sum() / union if union else 1.0
            )
    return np.mean([np.mean(v) for v in per.values()]) if per else np.nan


def test_acIOU_and_inter_class_iou_match_brute_force():
    rng = np.random.default_rng(0)
    flat = (rng.random((9, 12)) < 0.4).astype(np.float32)
    flat[0] = flat[1] = 0.0  # an empty pair of one class
    classes = np.array([0, 0, 1, 1, 1, 2, 0, 3, 1])  # class 2 and 3: one row each
    valid = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1])
    got = metrics.acIOU(jnp.asarray(flat), jnp.asarray(classes), 4, jnp.asarray(valid))
    assert float(got) == pytest.approx(_brute_iou(flat, classes, valid, True), rel=1e-5)
    got = metrics.inter_class_iou(jnp.asarray(flat), jnp.asarray(classes), jnp.asarray(valid))
    assert float(got) == pytest.approx(_brute_iou(flat, classes, valid, False), rel=1e-5)
    one = jnp.zeros(9, jnp.int32)
    assert np.isnan(float(metrics.inter_class_iou(jnp.asarray(flat), one)))
    assert np.isnan(float(metrics.acIOU(jnp.asarray(flat), jnp.arange(9), 9)))  # no pairs
    assert float(metrics.acIOU(jnp.asarray(flat[:2]), one[:2], 1)) == 1.0  # empty vs empty
    capped = metrics.acIOU(jnp.asarray(flat), jnp.asarray(classes), 4, max_rows=2)
    assert float(capped) == 1.0


def test_necessity_leakage_null_and_transfer():
    assert float(metrics.necessity_drop(FULL, PATH, valid_B=VALID2)) == pytest.approx(1 / 6)
    # row i holds H(x'_i; P(x_i)); classes c(x) = [0, 1, 0, 1], partner classes [1, 1, 1, 0]
    partner_logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    c, pc = jnp.array([0, 1, 0, 1]), jnp.array([1, 1, 1, 0])
    assert float(metrics.leakage(partner_logits, c, pc)) == pytest.approx(2 / 3)  # row 1 skipped
    assert float(metrics.leakage(partner_logits, c, pc, jnp.array([0, 1, 1, 1]))) == 0.5
    assert float(metrics.null_confidence(PATH[:2], jnp.array([0, 1]))) == pytest.approx(0.625)
    # transfer: pathway class k vs sample class y
    k, y = jnp.array([0, 1, 0, 1]), jnp.array([0, 0, 1, 0])
    transfer = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    assert float(metrics.class_leakage(transfer, k, y)) == pytest.approx(2 / 3)
    full = jnp.zeros((4, 2))  # own-class confidence 0.5 everywhere
    drop = metrics.other_class_drop(full, transfer, k, y)
    p_low = float(jax.nn.softmax(jnp.array([0.0, 2.0]))[0])
    assert float(drop) == pytest.approx((2 * (0.5 - p_low) / 0.5 + 0.0) / 3, rel=1e-5)


def test_different_class_partners():
    partner, has = metrics.different_class_partners(
        jnp.array([0, 0, 1, 2]), jnp.array([1, 1, 1, 0])
    )
    np.testing.assert_array_equal(partner[:3], [2, 2, 0])
    np.testing.assert_array_equal(has, [True, True, True, False])
    _, has = metrics.different_class_partners(jnp.zeros(3, jnp.int32))
    assert not bool(has.any())


def test_accumulator_matches_functions_and_is_exact_over_batches():
    c = jnp.array([0, 0, 1])
    kwargs = dict(pathway_logits_BxK=PATH, complement_logits_BxK=PATH, null_logits_BxK=PATH)
    one = acc_lib.summarize(FULL, acc_lib.Outputs(**kwargs), GATES, c, VALID2, num_classes=2)
    assert one["mIC"] == pytest.approx(float(metrics.mIC(FULL, PATH, c, VALID2)))
    assert one["mDC"] == pytest.approx(float(metrics.mDC(FULL, PATH, c, VALID2)))
    assert one["density_std"] == pytest.approx(float(metrics.density_std(GATES, VALID2)))
    assert one["necessity_drop"] == pytest.approx(
        float(metrics.necessity_drop(FULL, PATH, c, VALID2))
    )
    assert one["acIOU"] == pytest.approx(1 / 6)  # rows 0 and 1: 1 shared of 6 kept
    assert np.isnan(one.pop("inter_class_iou"))  # the only class-1 row is padding
    assert all(np.isfinite(v) for v in one.values())
    acc = acc_lib.MetricAccumulator(num_classes=2)
    flat = jnp.concatenate([GATES["a"], GATES["b"]], -1)
    for rows in (slice(0, 1), slice(1, 3)):
        g = {s: v[rows] for s, v in GATES.items()}
        outputs = acc_lib.Outputs(**{k: v[rows] for k, v in kwargs.items()})
        per = acc_lib.instance_metrics(FULL[rows], outputs, g, c[rows], VALID2[rows])
        acc.add(per, flat[rows], c[rows], VALID2[rows])
    for key, value in acc.result().items():
        if key == "inter_class_iou":
            continue
        assert value == pytest.approx(one[key], rel=1e-6), key


def test_accumulator_transfer_keys():
    full = jnp.zeros((4, 2))
    transfer = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    y, k = jnp.array([0, 0, 1, 0]), jnp.array([0, 1, 0, 1])
    outputs = acc_lib.Outputs(pathway_logits_BxK=transfer, pathway_classes_B=k)
    out = acc_lib.summarize(full, outputs, None, y)
    assert out["class_leakage"] == pytest.approx(float(metrics.class_leakage(transfer, k, y)))
    assert out["other_class_drop"] == pytest.approx(
        float(metrics.other_class_drop(full, transfer, k, y)), rel=1e-6
    )
    assert out["mIC"] == 100.0 and out["agreement"] == 1.0  # row 0 only: k = y


def test_deletion_insertion_auc_trivial_logits_fn():
    w_N = jnp.array([0.4, 0.3, 0.2, 0.1])
    traces = []

    def logits_fn(gates):
        traces.append(1)
        x_B = jnp.clip(jnp.concatenate([gates["a"], gates["b"]], -1) @ w_N, 1e-6, 1 - 1e-6)
        return jnp.stack([jnp.log(x_B), jnp.log1p(-x_B)], -1)  # p_0 = x

    scores = {"a": jnp.array([[0.4, 0.3]] * 2), "b": jnp.array([[0.2, 0.1]] * 2)}
    classes = jnp.zeros(2, jnp.int32)
    ins = perturbation.insertion_auc(logits_fn, scores, classes, num_points=5)
    dele = perturbation.deletion_auc(logits_fn, scores, classes, num_points=5)
    assert float(ins) == pytest.approx(0.625, abs=1e-5)
    assert float(dele) == pytest.approx(0.375, abs=1e-5)
    assert len(traces) == 2  # one trace per curve, not per point
    reversed_scores = jax.tree.map(lambda s: -s, scores)
    assert float(perturbation.insertion_auc(logits_fn, reversed_scores, classes, 5)) < 0.5


def test_randomize_weights_changes_params_keeps_batch_stats():
    model = classifiers.make_classifier("vgg", (4, 8), 3, 1)
    graphdef, state = nnx.split(model)
    new = perturbation.randomize_weights(state, seed=1)
    chex.assert_trees_all_equal_structs(new, state)
    params, stats = nnx.split_state(state, nnx.Param, ...)
    new_params, new_stats = nnx.split_state(new, nnx.Param, ...)
    chex.assert_trees_all_equal(new_stats, stats)
    kernel = new_params["block1"]["conv1"]["conv"]["kernel"][...]
    old_kernel = params["block1"]["conv1"]["conv"]["kernel"][...]
    assert not np.allclose(kernel, old_kernel)
    assert float(jnp.std(kernel)) == pytest.approx(float(jnp.std(old_kernel)), rel=0.3)
    logits, _ = classifiers.forward(graphdef, new, jnp.ones((2, 8, 8, 1)))
    chex.assert_tree_all_finite(logits)
