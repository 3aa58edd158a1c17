"""Pathway: jit round trip, density, IoU edge cases, take, save/load."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.method.pathway import Pathway

SITES = {"block1/conv1": 4, "block2/conv1": 6}


def _pathway(gate_value=None, batch=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(SITES) + 1)
    scores = {
        s: jax.random.uniform(k, (batch, c)) for (s, c), k in zip(SITES.items(), keys, strict=False)
    }
    if gate_value is None:
        gates = {s: (v > 0.5).astype(jnp.float32) for s, v in scores.items()}
    else:
        gates = {s: jnp.full((batch, c), gate_value, jnp.float32) for s, c in SITES.items()}
    logits = jax.random.normal(keys[-1], (batch, 5))
    return Pathway.create(gates, scores, logits, logits * 0.5)


def test_create_sets_explained_class():
    p = _pathway()
    np.testing.assert_array_equal(p.explained_class, jnp.argmax(p.full_logits, -1))
    assert p.explained_class.dtype == jnp.int32


def test_jit_round_trip():
    p = _pathway()
    q = jax.jit(lambda x: x)(p)
    chex.assert_trees_all_equal(p, q)
    np.testing.assert_allclose(jax.jit(lambda x: x.density())(p), p.density())


def test_density():
    p = _pathway()
    flat = np.concatenate([np.asarray(p.gates[s]) for s in SITES], -1)
    np.testing.assert_allclose(p.density(), flat.mean(-1))
    np.testing.assert_allclose(_pathway(1.0).density(), np.ones(3))
    sd = _pathway(0.0).site_density()
    assert set(sd) == set(SITES)
    np.testing.assert_allclose(sd["block1/conv1"], np.zeros(3))


def test_iou_edge_cases():
    empty, full = _pathway(0.0), _pathway(1.0)
    np.testing.assert_allclose(empty.iou(empty), np.ones(3))
    np.testing.assert_allclose(full.iou(full), np.ones(3))
    np.testing.assert_allclose(empty.iou(full), np.zeros(3))
    p = _pathway()
    disjoint = p.replace(gates={s: 1.0 - g for s, g in p.gates.items()})
    np.testing.assert_allclose(p.iou(disjoint), np.zeros(3))
    np.testing.assert_allclose(p.iou(full), p.density(), rtol=1e-6)


def test_iou_is_site_order_independent():
    p = _pathway()
    reordered = p.replace(gates=dict(reversed(list(p.gates.items()))))
    np.testing.assert_allclose(p.iou(reordered), np.ones(3))


def test_take():
    p = _pathway()
    q = p.take(jnp.array([2, 0]))
    assert q.full_logits.shape == (2, 5)
    np.testing.assert_array_equal(q.gates["block2/conv1"][0], p.gates["block2/conv1"][2])
    np.testing.assert_array_equal(q.explained_class, p.explained_class[jnp.array([2, 0])])


def test_save_load_round_trip(tmp_path):
    p = _pathway()
    path = tmp_path / "pathway.npz"
    p.save(path)
    q = Pathway.load(path)
    chex.assert_trees_all_equal(p, q)
    assert list(q.gates) == list(SITES)
    numpy_dict = p.to_numpy()
    assert isinstance(numpy_dict["gates"]["block1/conv1"], np.ndarray)


def test_ranking_defaults_to_the_scores_logits_and_survives_save_and_old_files(tmp_path):
    p = _pathway()
    for site, scores in p.scores.items():  # the same order as the scores
        np.testing.assert_array_equal(
            np.argsort(np.asarray(p.ranking[site])), np.argsort(np.asarray(scores))
        )
    ranked = p.replace(ranking={s: -v for s, v in p.ranking.items()})  # e.g. a rank head's
    ranked.save(tmp_path / "ranked.npz")
    chex.assert_trees_all_equal(Pathway.load(tmp_path / "ranked.npz").ranking, ranked.ranking)
    # a file saved before pathways had a ranking: the scores' logits
    with np.load(tmp_path / "ranked.npz") as data:
        old = {k: data[k] for k in data.files if not k.startswith("ranking/")}
    np.savez(tmp_path / "old.npz", **old)
    chex.assert_trees_all_close(Pathway.load(tmp_path / "old.npz").ranking, p.ranking, rtol=1e-5)
