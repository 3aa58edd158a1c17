"""Controls: class means of scores, one mask per class / for all, specificity gain."""

import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.eval import baselines, controls


def test_class_constant_equals_per_class_top_channels():
    # 3 classes, 6 channels: class k's training rows score channels distinctly
    scores_BxN = np.array(
        [
            [5, 4, 0, 0, 1, 0],  # class 0
            [7, 2, 0, 0, 1, 0],  # class 0: mean [6, 3, 0, 0, 1, 0] -> top 2 = {0, 1}
            [0, 0, 9, 8, 0, 0],  # class 1 -> top 2 = {2, 3}
            [0, 1, 0, 0, 3, 6],  # class 2 -> top 2 = {5, 4}
        ],
        np.float32,
    )
    classes_B = np.array([0, 0, 1, 2])
    mean_N, mean_KxN = controls.class_mean_scores(scores_BxN, classes_B, 3)
    np.testing.assert_allclose(mean_KxN[0], [6, 3, 0, 0, 1, 0])
    np.testing.assert_allclose(mean_N, scores_BxN.mean(0))
    masks_KxN = np.asarray(controls.class_masks(mean_KxN, 2 / 6, jax.random.key(0)))
    expected = np.zeros((3, 6), np.float32)
    expected[0, [0, 1]] = expected[1, [2, 3]] = expected[2, [4, 5]] = 1
    np.testing.assert_array_equal(masks_KxN, expected)
    # applied with each input's predicted class
    test_classes_B = np.array([2, 0, 0, 1])
    np.testing.assert_array_equal(masks_KxN[test_classes_B], expected[test_classes_B])


def test_class_without_rows_takes_the_overall_mean():
    mean_N, mean_KxN = controls.class_mean_scores(
        np.eye(3, dtype=np.float32), np.array([0, 0, 1]), 4
    )
    np.testing.assert_allclose(mean_KxN[3], mean_N)
    np.testing.assert_allclose(mean_KxN[2], mean_N)


def test_constant_mask_is_one_mask_of_exact_size():
    mean_N = jnp.array([0.1, 0.9, 0.5, 0.5, 0.5, 0.0])
    m = np.asarray(controls.constant_mask(mean_N, 0.5, jax.random.key(3)))
    assert m.sum() == 3 and m[1] == 1 and m[0] == 0 and m[5] == 0
    m_again = np.asarray(controls.constant_mask(mean_N, 0.5, jax.random.key(3)))
    np.testing.assert_array_equal(m, m_again)
    np.testing.assert_array_equal(
        m,
        np.asarray(baselines.top_k_at_density(mean_N[None], 0.5, jax.random.key(3), jnp.arange(1)))[
            0
        ],
    )


def test_specificity_gain_and_better_source():
    assert controls.specificity_gain(20.0, 10.0) == 2.0
    assert np.isnan(controls.specificity_gain(20.0, 0.0))
    assert controls.better_source({"gencnp_score": 12.0, "mct_score": 8.0}) == "mct_score"
    assert controls.better_source({"gencnp_score": float("nan"), "mct_score": 8.0}) == "mct_score"
