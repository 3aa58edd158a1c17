"""The generator's objective: each term is its documented formula, and a term left out is
not computed (nor its gated passes made)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import GENERATOR

from gencnp_jax.eval import baselines
from gencnp_jax.method import evidence, losses, objective
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.models.generator import Generator

IMAGES = jax.random.normal(jax.random.key(0), (6, 16, 16, 1))


def _hp(**overrides):
    values = dict(
        temperature=2.0, sigma=2.0, tau=2.0, hinge_margin=1.0, leak_margin=1.0, ramp_steps=0.0,
        ranked_low=0.05, ranked_high=0.4,
    )  # fmt: skip
    values.update(overrides)
    return objective.StepHParams(**{k: jnp.float32(v) for k, v in values.items()})


class Recording(FrozenClassifier):
    """A frozen classifier that records the rows of every gated pass."""

    def __init__(self, frozen, rows):
        super().__init__(frozen.graphdef, frozen.state, frozen.site_channels, frozen.num_classes)
        self.rows = rows

    def classify(self, images, gates=None):
        if gates is not None:
            self.rows.append(images.shape[0])
        return super().classify(images, gates)


@pytest.fixture(scope="module")
def setup():
    model = classifiers.make_classifier("vgg", (8, 16), 10, 1)
    model.eval()
    generator = Generator(model.site_channels, 10, **GENERATOR, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    classifier = FrozenClassifier(graphdef, state, model.site_channels, 10)
    batch = objective.batch_of(generator, classifier, IMAGES)
    chex.assert_trees_all_close(batch["full_logits"], classifier.logits(IMAGES))
    chex.assert_trees_all_equal(batch["pools"], generator.pools(classifier.classify(IMAGES)[1]))
    return generator, classifier, batch


def _targets(generator, classifier, images):
    """The targets' reading, as a training loop reads it once (`objective.read`)."""
    _, pools, fo = objective.read(generator, classifier, images)
    return {"target_pools": pools, "target_fo": fo}


BASE = ("kd", "hinge", "sparsity", "pdn", "leak")


def test_each_term_is_its_documented_formula(setup):
    generator, classifier, batch = setup
    classify = classifier.classify
    terms, gates, path_logits, _ = objective.loss_terms(generator, classifier, batch, _hp(), BASE)
    assert tuple(terms) == BASE
    # DAQ's soft value is the hard gate in value: sparsity on it is the density
    density = float(jnp.mean(gates_lib.flatten(gates)))
    assert float(terms["sparsity"]) == pytest.approx(density, abs=1e-6)
    partner_logits = classify(batch["images"][batch["partner"]], gates)[0]
    expected = losses.leakage_hinge(partner_logits, batch["pred"], batch["has_partner"], 1.0)
    assert float(terms["leak"]) == pytest.approx(float(expected), rel=1e-5)
    scores, _ = generator(classify(batch["images"])[1])
    targets = jnp.round(gates_lib.flatten(scores))[:2]
    with_targets = {**batch, **_targets(generator, classifier, batch["images"][:2])}
    with_targets["target_masks"] = targets
    distilled, *_ = objective.loss_terms(generator, classifier, with_targets, _hp(), ("distill",))
    expected = losses.mask_bce(gates_lib.flatten(scores)[:2], targets)
    assert float(distilled["distill"]) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_array_equal(gates_lib.flatten(gates), jnp.round(gates_lib.flatten(gates)))


def test_a_term_left_out_makes_no_gated_pass(setup):
    generator, classifier, batch = setup
    rows = []
    recording = Recording(classifier, rows)
    objective.loss_terms(generator, recording, batch, _hp(), ("kd",))
    assert rows == [6]  # x only: no partner pass without the leakage term
    rows.clear()
    objective.loss_terms(generator, recording, batch, _hp(), ("kd", "leak"))
    assert rows == [12]  # x and x' in one pass
    rows.clear()
    scores, _ = generator(classifier.classify(batch["images"])[1])
    with_targets = {**batch, **_targets(generator, classifier, batch["images"][:2])}
    with_targets["target_masks"] = jnp.round(gates_lib.flatten(scores))[:2]
    objective.loss_terms(generator, recording, with_targets, _hp(), ("kd", "leak", "distill"))
    assert rows == [12]  # the targets are read once by the loop, not by the loss


def test_step_weights_ramp_the_sparsity_weight():
    weights = losses.LossWeights.create(**{t: 2.0 for t in losses.TERMS})
    hp = _hp(ramp_steps=10.0)
    early = objective.step_weights(weights, jnp.float32(2.0), hp)
    late = objective.step_weights(weights, jnp.float32(20.0), hp)
    assert float(early.sparsity) == pytest.approx(0.4) and float(early.kd) == 2.0
    assert float(late.sparsity) == pytest.approx(2.0)


def test_ranked_term_gates_x_with_its_own_top_scores_at_each_rows_density(setup):
    generator, classifier, batch = setup
    classify = classifier.classify
    density_B = objective.ranked_densities(6, jnp.int32(0), _hp())
    batch = {**batch, "ranked_density": density_B}
    terms, *_ = objective.loss_terms(generator, classifier, batch, _hp(), ("ranked",))
    scores, _ = generator(classify(batch["images"])[1])
    top = baselines.gates_at_density(scores, density_B)
    expected = losses.distillation_kl(batch["full_logits"], classify(batch["images"], top)[0], 2.0)
    assert float(terms["ranked"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["ranked"]) > 0.0  # gating at 5-40% density changes the prediction


def test_ranked_densities_cover_their_range_and_move_with_the_step():
    hp = _hp(ranked_low=0.1, ranked_high=0.3)
    first = np.asarray(objective.ranked_densities(64, jnp.int32(0), hp))
    second = np.asarray(objective.ranked_densities(64, jnp.int32(1), hp))
    assert first.min() >= 0.1 and first.max() < 0.3
    assert first.min() < 0.11 and first.max() > 0.29  # evenly spread within each batch
    counts = np.histogram(first, bins=4, range=(0.1, 0.3))[0]
    assert counts.min() >= 14  # each quarter of the range gets about a quarter of the rows
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, objective.ranked_densities(64, jnp.int32(0), hp))


def test_rank_term_trains_the_rank_head_and_the_gated_terms_the_gate_head(setup):
    _, classifier, batch = setup
    kwargs = {**GENERATOR, "grad_evidence": True, "rank_head": True}
    generator = Generator(classifier.site_channels, 10, **kwargs, rngs=nnx.Rngs(0))
    teacher = jax.random.normal(jax.random.key(5), (2, classifier.num_neurons))
    batch = objective.batch_of(generator, classifier, IMAGES)  # this generator reads fo
    targets = {**_targets(generator, classifier, IMAGES[:2]), "teacher_logits": teacher}
    with_targets = {**batch, **targets, "target_masks": jnp.ones_like(teacher)}
    terms, *_ = objective.loss_terms(generator, classifier, with_targets, _hp(), ("rank",))
    _, features, fo = evidence.first_order_effects(classifier, batch["images"][:2])
    ranking = gates_lib.flatten(generator.ranking(features, fo))
    assert float(terms["rank"]) == pytest.approx(float(losses.listnet(ranking, teacher)), rel=1e-5)
    graphdef, params, rest = nnx.split(generator, nnx.Param, ...)

    def grads(names):
        def loss(p):
            model = nnx.merge(graphdef, p, rest)
            computed, *_ = objective.loss_terms(model, classifier, with_targets, _hp(), names)
            return sum(computed.values())

        return nnx.to_pure_dict(jax.grad(loss)(params))

    def norm(tree):
        return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))

    rank_grads, gated_grads = grads(("rank",)), grads(BASE + ("distill",))
    rank_parts = ("rank_heads", "rank_evidence", "rank_fo_weight")
    gate_parts = ("score_heads", "evidence", "fo_weight")
    assert all(norm(rank_grads[p]) > 0 for p in rank_parts)
    assert all(norm(rank_grads[p]) == 0 for p in gate_parts)
    assert all(norm(gated_grads[p]) == 0 for p in rank_parts)
    assert all(norm(gated_grads[p]) > 0 for p in gate_parts)
