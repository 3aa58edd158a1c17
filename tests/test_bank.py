"""Tests for bank.py: aggregation, orbax round trip, mismatch errors and transfer.

Untrained tiny classifiers only (no training, no data): each test runs in seconds.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gencnp_jax.eval import perturbation
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import class_bank as bank
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.stages import build_bank

K = 10


def _classifier(widths=(4, 8), seed=0) -> FrozenClassifier:
    model = classifiers.make_classifier("vgg", widths, K, 1, seed=seed)
    graphdef, state = classifiers.split(model)
    return FrozenClassifier(graphdef, state, model.site_channels, K)


def _bank(classifier, config, seed=0, with_scores=True) -> bank.ClassBank:
    """A bank from random binary gates (and scores) of 3 samples per class (class 9 empty)."""
    rng = np.random.default_rng(seed)
    classes_B = np.repeat(np.arange(K - 1), 3)
    sites = classifier.site_channels
    gates = {
        s: jnp.asarray(rng.random((len(classes_B), c)) < 0.5, jnp.float32) for s, c in sites.items()
    }
    scores = {
        s: jnp.asarray(rng.normal(size=(len(classes_B), c)), jnp.float32) for s, c in sites.items()
    }
    b = config.bank
    freq, masks, counts = bank.aggregate(gates, jnp.asarray(classes_B), K, b.threshold)
    score_mean = bank.class_means(scores, jnp.asarray(classes_B), K)[0] if with_scores else None
    return bank.ClassBank(
        freq,
        masks,
        counts,
        b.samples_per_class,
        b.threshold,
        b.class_source,
        build_bank.fingerprint(classifier.state, classifier.site_channels),
        score_mean,
    )


@pytest.fixture(name="config")
def fixture_config():
    config = tiny.get_config()
    config.bank.samples_per_class = 3
    return config


def test_aggregate_frequencies_masks_counts():
    gates = {"a": jnp.asarray([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 1, 1]], jnp.float32)}
    classes_B = jnp.asarray([0, 0, 1, 0])
    valid_B = jnp.asarray([1, 1, 1, 0])  # the last row is padding
    freq, masks, counts = bank.aggregate(gates, classes_B, 3, 0.5, valid_B)
    np.testing.assert_allclose(freq["a"], [[1, 0.5, 0.5], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(masks["a"], [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(counts, [2, 1, 0])
    # an empty class stays empty even at threshold 0
    _, masks0, _ = bank.aggregate(gates, classes_B, 3, 0.0, valid_B)
    np.testing.assert_array_equal(masks0["a"][2], [0, 0, 0])


def test_first_per_class_in_dataset_order():
    classes_N = np.asarray([2, 0, 2, 1, 2, 0, 2])
    np.testing.assert_array_equal(bank.first_per_class(classes_N, 3, 2), [1, 5, 3, 0, 2])


def test_fingerprint_sensitive_to_weights_and_sites():
    classifier = _classifier()
    fp = build_bank.fingerprint(classifier.state, classifier.site_channels)
    assert fp == build_bank.fingerprint(classifier.state, dict(classifier.site_channels))
    other = perturbation.randomize_weights(classifier.state, 1)
    assert fp != build_bank.fingerprint(other, classifier.site_channels)
    renamed = {f"x/{s}": c for s, c in classifier.site_channels.items()}
    assert fp != build_bank.fingerprint(classifier.state, renamed)


def test_round_trip(config, tmp_path):
    classifier = _classifier()
    built = _bank(classifier, config)
    meta = build_bank.save_bank(built, str(tmp_path), list(classifier.site_channels))
    assert os.path.exists(tmp_path / "bank" / build_bank.BANK_JSON)
    assert meta["counts"] == [3] * (K - 1) + [0] and meta["empty_classes"] == [K - 1]
    loaded = build_bank.load_bank(config, str(tmp_path), classifier)
    chex.assert_trees_all_equal(
        (loaded.freq, loaded.masks, loaded.counts, loaded.score_mean),
        (built.freq, built.masks, built.counts, built.score_mean),
    )
    assert (
        loaded.samples_per_class,
        loaded.threshold,
        loaded.class_source,
        loaded.fingerprint,
    ) == (built.samples_per_class, built.threshold, built.class_source, built.fingerprint)
    # rebuilding replaces the stored bank
    rebuilt = _bank(classifier, config, seed=1)
    build_bank.save_bank(rebuilt, str(tmp_path), list(classifier.site_channels))
    chex.assert_trees_all_equal(
        build_bank.load_bank(config, str(tmp_path), classifier).masks, rebuilt.masks
    )


def test_a_bank_without_mean_scores_loads_and_ranks_by_frequency(config, tmp_path):
    classifier = _classifier()
    old = _bank(classifier, config, with_scores=False)  # as banks of format 1 were stored
    meta = build_bank.save_bank(old, str(tmp_path), list(classifier.site_channels))
    assert meta["format"] == 1
    loaded = build_bank.load_bank(config, str(tmp_path), classifier)
    assert loaded.score_mean is None
    np.testing.assert_array_equal(loaded.ranking(), np.asarray(gates_lib.flatten(old.freq)))


def test_ranking_orders_by_frequency_then_breaks_ties_by_mean_score():
    freq = {"a": jnp.asarray([[1.0, 1.0, 0.5, 1.0, 0.0], [0.0, 0.5, 0.5, 0.0, 1.0]])}
    score = {"a": jnp.asarray([[0.2, 3.0, 9.0, -1.0, 5.0], [0.0, 2.0, 1.0, 7.0, 0.0]])}
    b = bank.ClassBank(freq, freq, jnp.asarray([2, 2], jnp.int32), score_mean=score)
    order = np.argsort(-b.ranking(), axis=-1)
    # F_c first (a high score never lifts a lower F_c), then the class's mean score
    np.testing.assert_array_equal(order, [[1, 0, 3, 2, 4], [4, 1, 2, 3, 0]])
    assert b.ranking().dtype == np.float32
    tied = bank.ClassBank(freq, freq, jnp.asarray([2, 2], jnp.int32), score_mean=freq)
    np.testing.assert_array_equal(tied.ranking()[0, [0, 1, 3]], tied.ranking()[0, 0])  # a tie


def test_mismatch_errors(config, tmp_path):
    classifier = _classifier()
    build_bank.save_bank(_bank(classifier, config), str(tmp_path), list(classifier.site_channels))
    other_weights = classifier.with_state(perturbation.randomize_weights(classifier.state, 3))
    with pytest.raises(build_bank.BankMismatchError, match="built for another classifier") as err:
        build_bank.load_bank(config, str(tmp_path), other_weights)
    assert "--mode=build_bank" in str(err.value) and "weights differ" in str(err.value)
    with pytest.raises(build_bank.BankMismatchError, match="--mode=build_bank"):
        build_bank.load_bank(config, str(tmp_path), _classifier(widths=(4, 8, 8)))
    config.bank.threshold = 0.6
    with pytest.raises(build_bank.BankMismatchError, match="threshold"):
        build_bank.load_bank(config, str(tmp_path), classifier)


def test_missing_bank_names_the_stage(config, tmp_path):
    with pytest.raises(workdir_lib.StageOrderError, match="--mode=build_bank"):
        build_bank.load_bank(config, str(tmp_path), _classifier())


def test_transfer_all_ones_bank_is_the_full_model(config):
    classifier = _classifier()
    ones = {s: jnp.ones((K, c), jnp.float32) for s, c in classifier.site_channels.items()}
    all_open = bank.ClassBank(ones, ones, jnp.full((K,), 3, jnp.int32))
    images = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))
    classes_B = jnp.asarray([0, 3, 9, 3, 1, 2])
    gates = jax.jit(bank.transfer)(all_open, classes_B)
    chex.assert_shape(list(gates.values()), [(6, c) for c in classifier.site_channels.values()])
    full, _ = classifiers.forward(classifier.graphdef, classifier.state, images)
    gated, _ = classifiers.forward(classifier.graphdef, classifier.state, images, gates)
    np.testing.assert_array_equal(np.asarray(gated), np.asarray(full))


def test_transfer_picks_each_samples_class_pathway(config):
    classifier = _classifier()
    b = _bank(classifier, config)
    classes_B = jnp.asarray([4, 0, 4])
    gates = bank.transfer(b, classes_B)
    for site, g in gates.items():
        np.testing.assert_array_equal(g, b.masks[site][np.asarray(classes_B)])
    np.testing.assert_allclose(b.class_density()[K - 1], 0.0)  # the empty class
