"""Generator training: the frozen classifier never changes, the step learns and compiles once,
the stage checks its order, writes its metrics and a checkpoint that `explain` loads."""

import copy
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gencnp_jax import explainer
from gencnp_jax.context import inputs, loading
from gencnp_jax.io import checkpointing
from gencnp_jax.io import workdir as workdir_lib
from gencnp_jax.method import explain, losses, objective
from gencnp_jax.models import classifiers, daq
from gencnp_jax.models.frozen import FrozenClassifier
from gencnp_jax.train import classifier as train_classifier_lib
from gencnp_jax.train import fills as fills_lib
from gencnp_jax.train import generator as train_generator
from gencnp_jax.train import generator_metrics
from gencnp_jax.train import loop as train_loop

NUM_LEARN_STEPS = 8


@pytest.fixture(scope="module")
def scenario(tiny_config):
    """Runs the jitted generator step against a small classifier (two gate sites: a quick
    compile) and records what the tests check: the classifier before and after, the losses
    on a fixed batch, the trace count.

    Phase 1: `NUM_LEARN_STEPS` steps on one batch with fixed weights (lr 1e-2, sparsity on
    from step 0). Phase 2: other batches, step indices, loss weights and DAQ settings.
    """
    config = copy.deepcopy(tiny_config)
    model = classifiers.make_classifier("vgg", (8, 16), 10, 1, 1, seed=0)
    graphdef, state = classifiers.split(model)
    classifier = FrozenClassifier(graphdef, state, model.site_channels, 10)
    cls_before = jax.tree.map(np.array, classifier.state)  # host copies
    gen_graphdef, _, state = train_generator.init_state(config, classifier)
    base = train_classifier_lib.make_optimizer(1e-2, 0.0, 1, 100, 1.0)
    traces = []

    def counting_update(updates, state, params=None):
        traces.append(1)  # runs at trace time only
        return base.update(updates, state, params)

    tx = optax.GradientTransformation(base.init, counting_update)
    state = state.replace(opt_state=tx.init(state.params))
    gen_params_before = jax.tree.map(np.array, state.params)
    config.generator.loss.sparsity_ramp_steps = 0
    config.generator.loss.w_sparsity = 2.0
    hp, weights = train_generator.hparams_from_config(config.generator)
    step = train_generator.make_train_step(gen_graphdef, tx, weights.active())
    step_fn = jax.jit(chex.assert_max_traces(step.__wrapped__, n=1), donate_argnums=0)
    train = inputs.load_data(config, "train")

    def batch(i):
        return jnp.asarray(inputs.normalize(config, train.images[32 * i : 32 * (i + 1)]))

    images = batch(0)
    learn = []
    for i in range(NUM_LEARN_STEPS):
        state, out = step_fn(state, images, jnp.int32(i), classifier, weights, hp)
        learn.append(jax.tree.map(float, out))
    traces_after_learning = len(traces)
    other_weights = weights.replace(
        **{t: jnp.float32(w) for t, w in dict(kd=0.5, hinge=0.0, sparsity=0.1, leak=0.3).items()}
    )
    other_hp = hp.replace(temperature=jnp.float32(3.0), ramp_steps=jnp.float32(50.0))
    for i, (w, h) in enumerate(
        [(other_weights, hp), (weights, other_hp), (other_weights, other_hp)]
    ):
        state, out = step_fn(state, batch(i + 1), jnp.int32(100 * i + 7), classifier, w, h)
        chex.assert_tree_all_finite(out)
    return {
        "classifier": classifier,
        "cls_before": cls_before,
        "gen": state,
        "gen_params_before": gen_params_before,
        "learn": learn,
        "traces_after_learning": traces_after_learning,
        "traces": len(traces),
    }


def test_classifier_is_bit_identical_after_generator_steps(scenario):
    state = scenario["classifier"].state
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))  # not donated
    # Every leaf, BatchNorm statistics included (the step must run H in inference mode).
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(scenario["cls_before"])) > 0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), scenario["cls_before"])
    # ...while the generator did change (the steps were not no-ops).
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != b)),
        scenario["gen"].params,
        scenario["gen_params_before"],
    )
    assert np.mean(jax.tree.leaves(moved)) > 0.8


def test_generator_steps_lower_the_loss_on_a_fixed_batch(scenario):
    totals = [out["loss/total"] for out in scenario["learn"]]
    sparsity = [out["loss/sparsity"] for out in scenario["learn"]]
    assert all(np.isfinite(totals))
    assert totals[-1] < totals[0] - 0.05, totals
    assert sparsity[-1] < sparsity[0], sparsity
    assert scenario["learn"][0]["weight/sparsity"] == pytest.approx(2.0)  # no ramp: full weight


def test_generator_step_compiles_once(scenario):
    assert scenario["traces_after_learning"] == 1
    # Other batches, step indices, loss weights and DAQ settings: still the one trace.
    assert scenario["traces"] == 1


def test_train_generator_needs_a_trained_classifier(tiny_config, tmp_path):
    with pytest.raises(workdir_lib.StageOrderError, match="--mode=train_classifier"):
        train_generator.train_generator(tiny_config, str(tmp_path))


def test_explainer_needs_a_trained_generator(tiny_config, trained_workdir):
    with pytest.raises(workdir_lib.StageOrderError, match="--mode=train_generator"):
        explainer.Explainer.from_workdir(trained_workdir, tiny_config)


def test_generator_metrics_json(generator_workdir):
    path = os.path.join(workdir_lib.generator_dir(generator_workdir), "metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    for key in ("agreement", "density_mean", "density_std", "leakage"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    for key in ("mDC", "mIC"):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics[key])
    assert metrics["num_examples"] == 128 and metrics["train_steps"] == 24


def test_channel_means_are_the_mean_over_images_and_positions(tiny_config, trained_workdir):
    """The mean-ablation fills: every channel's mean over images and positions (float64
    reference), whatever the batch size (the last batch of 64 is padded)."""
    classifier = loading.load_classifier(tiny_config, trained_workdir)
    images = inputs.load_data(tiny_config, "train").images[:96]
    norm = lambda x: inputs.normalize(tiny_config, x)
    mesh = inputs.make_mesh(tiny_config)
    _, features = classifier.classify(jnp.asarray(norm(images)))
    for batch_size in (32, 64):
        means = fills_lib.channel_means(classifier, images, norm, batch_size, mesh)
        assert set(means) == set(features)
        for site, f in features.items():
            want = np.asarray(f, np.float64).reshape(-1, f.shape[-1]).mean(0)
            chex.assert_shape(means[site], want.shape)
            assert means[site].dtype == np.float32
            np.testing.assert_allclose(means[site], want, rtol=1e-5, atol=1e-6, err_msg=site)


def test_final_checkpoint_round_trip(tiny_config, generator_workdir, tmp_path):
    classifier = loading.load_classifier(tiny_config, generator_workdir)
    generator, with_fills, means = loading.load_generator(
        tiny_config, generator_workdir, classifier
    )
    state, fills = generator.state, with_fills.fills
    assert tiny_config.generator.ablation == "mean"  # the default: closed gates take the means
    assert fills is not None and set(fills) == set(means)
    for site in means:
        np.testing.assert_array_equal(fills[site], means[site])
    train = inputs.load_data(tiny_config, "train")
    mesh = inputs.make_mesh(tiny_config)
    expected_means = fills_lib.channel_means(
        classifier, train.images, lambda x: inputs.normalize(tiny_config, x), 500, mesh
    )
    assert set(means) == set(classifier.site_channels)
    for site, c in classifier.site_channels.items():
        chex.assert_shape(means[site], (c,))
        np.testing.assert_allclose(means[site], expected_means[site], rtol=1e-5, atol=1e-6)
    fresh = nnx.state(loading.new_generator(tiny_config, classifier.site_channels, 10))
    assert jax.tree.structure(state) == jax.tree.structure(fresh)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(fresh), strict=True)
    )
    # The checkpoint is the generator that was evaluated: its metrics come out again.
    test = inputs.load_data(tiny_config, "test")
    again = generator_metrics.evaluate_split(tiny_config, generator, with_fills, test, mesh)
    with open(os.path.join(workdir_lib.generator_dir(generator_workdir), "metrics.json")) as f:
        saved = json.load(f)
    for key, value in again.items():
        assert value == pytest.approx(saved[key], abs=1e-6), key
    # Save -> load_generator gives back exactly what was saved.
    perturbed = jax.tree.map(
        lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    mean_fills = {s: np.full((c,), 0.25, np.float32) for s, c in classifier.site_channels.items()}
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir_lib.generator_dir(str(tmp_path)), "final")
    )
    ckpt.save(3, {"generator": perturbed, "means": mean_fills})
    ckpt.close()
    mean_config = copy.deepcopy(tiny_config)
    mean_config.generator.ablation = "mean"
    loaded, with_fills, means = loading.load_generator(mean_config, str(tmp_path), classifier)
    loaded, fills = loaded.state, with_fills.fills
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, perturbed)
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, fills), mean_fills)


def test_explainer_returns_binary_pathways(tiny_config, generator_workdir):
    explain_fn = explainer.Explainer.from_workdir(generator_workdir, tiny_config)
    test = inputs.load_data(tiny_config, "test")
    images = test.images[:16]
    pathway = explain_fn(images)
    site_channels = explain_fn.classifier.site_channels
    assert set(pathway.gates) == set(site_channels) == set(pathway.scores)
    for site, c in site_channels.items():
        gates = np.asarray(pathway.gates[site])
        chex.assert_shape(gates, (16, c))
        assert np.all((gates == 0.0) | (gates == 1.0)), site
        scores = np.asarray(pathway.scores[site])
        assert np.all((scores >= 0.0) & (scores <= 1.0))
    chex.assert_shape([pathway.full_logits, pathway.pathway_logits], (16, 10))
    normalized = jnp.asarray(inputs.normalize(tiny_config, images))
    cls = explain_fn.classifier  # its fills: the ablation value the generator trained with
    full, _ = classifiers.forward(cls.graphdef, cls.state, normalized)
    gated, _ = classifiers.forward(cls.graphdef, cls.state, normalized, pathway.gates, cls.fills)
    assert cls.fills is not None
    chex.assert_trees_all_close(pathway.full_logits, full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(pathway.pathway_logits, gated, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pathway.explained_class, np.argmax(full, -1))
    # Float images are used as they are: the same pathway as for the uint8 batch.
    again = explain_fn(np.asarray(normalized))
    chex.assert_trees_all_equal(again.gates, pathway.gates)


def test_fit_generator_trains_in_memory(tiny_config, trained_workdir, tmp_path, monkeypatch):
    """A fresh generator on the trained classifier: the loss falls, the gates are 0/1, and
    nothing is written (run from an empty working directory)."""
    monkeypatch.chdir(tmp_path)
    classifier = loading.load_classifier(tiny_config, trained_workdir)
    train = inputs.load_data(tiny_config, "train")
    mesh = inputs.make_mesh(tiny_config)
    logged = []
    log = train_loop.log_metrics
    monkeypatch.setattr(
        train_loop, "log_metrics", lambda w, b, step, m: (logged.append(m), log(w, b, step, m))
    )
    generator = train_generator.fit_generator(tiny_config, classifier, train, mesh, 16, seed=5)
    state = generator.state
    assert os.listdir(tmp_path) == []
    sparsity = [float(m["loss/sparsity"]) for m in logged]
    assert len(sparsity) == 4 and sparsity[-1] < sparsity[0], sparsity
    fresh = nnx.state(loading.new_generator(tiny_config, classifier.site_channels, 10))
    assert jax.tree.structure(state) == jax.tree.structure(fresh)
    images = jnp.asarray(inputs.normalize(tiny_config, train.images[:32]))
    settings = daq.Settings.create(2.0, 2.0)
    p = explain.explain(generator, classifier, images, settings)
    for gates in jax.tree.leaves(p.gates):
        assert np.all((np.asarray(gates) == 0.0) | (np.asarray(gates) == 1.0))


def test_ranked_term_trains_the_ranking_through_the_cut(scenario, tiny_config):
    """With only the ``ranked`` term weighted, steps move the rank head (what ranks x at a
    fixed density) and leave the gate head alone."""
    classifier = scenario["classifier"]
    gen_graphdef, tx, state = train_generator.init_state(tiny_config, classifier)
    hp, _ = train_generator.hparams_from_config(tiny_config.generator)
    hp = hp.replace(ranked_low=jnp.float32(0.2), ranked_high=jnp.float32(0.2))
    zero = {t: 0.0 for t in losses.TERMS}
    weights = losses.LossWeights.create(**{**zero, "ranked": 1.0})
    step_fn = train_generator.make_train_step(gen_graphdef, tx, weights.active())
    train = inputs.load_data(tiny_config, "train")
    images = jnp.asarray(inputs.normalize(tiny_config, train.images[:32]))
    before = nnx.to_pure_dict(jax.tree.map(np.array, state.params))
    ranked = []
    for i in range(8):  # the tiny config warms its rate up over 4 steps
        state, out = step_fn(state, images, jnp.int32(i), classifier, weights, hp)
        ranked.append(float(out["loss/ranked"]))
    after = nnx.to_pure_dict(jax.tree.map(np.array, state.params))
    assert np.all(np.isfinite(ranked)) and ranked[0] > 0

    def moved(part):
        pairs = zip(jax.tree.leaves(after[part]), jax.tree.leaves(before[part]), strict=True)
        return max(float(np.max(np.abs(a - b))) for a, b in pairs)

    assert moved("rank_heads") > 1e-3 and moved("rank_fo_weight") > 1e-3
    assert moved("score_heads") == 0.0 and moved("fo_weight") == 0.0


def test_step_reads_its_batch_once_and_its_targets_never(tiny_config, monkeypatch):
    """One classifier call reads the batch (clean logits, features and first-order effects
    together), one more makes every gated pass; the PIO targets come already read
    (`train_generator.target_readings`): no call sees their rows."""
    model = classifiers.make_classifier("vgg", (8, 16), 10, 1, 1, seed=0)
    classifier = FrozenClassifier(*classifiers.split(model), model.site_channels, 10)
    gen_graphdef, tx, state = train_generator.init_state(tiny_config, classifier)
    hp, weights = train_generator.hparams_from_config(tiny_config.generator)
    assert {"distill", "rank", "leak", "ranked"} <= set(weights.active())
    generator = nnx.merge(gen_graphdef, state.model_state())
    assert generator.grad_evidence and generator.rank_head
    images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    _, pools, fo = objective.read(generator, classifier, images[:4])
    batch = {
        "images": images,
        "target_masks": jnp.zeros((4, classifier.num_neurons)),
        "teacher_logits": jnp.zeros((4, classifier.num_neurons)),
        "target_pools": pools,
        "target_fo": fo,
    }
    rows, classify = [], FrozenClassifier.classify

    def counting(self, x, gates=None):
        rows.append(x.shape[0])
        return classify(self, x, gates)

    monkeypatch.setattr(FrozenClassifier, "classify", counting)
    step = train_generator.make_train_step(gen_graphdef, tx, weights.active())
    _, out = jax.eval_shape(step.__wrapped__, state, batch, jnp.int32(0), classifier, weights, hp)
    assert "loss/distill" in out and "loss/rank" in out
    # the read of x; then x, its partners and x at its ranked density, gated in one pass
    assert rows == [8, 24]
