"""Generator: one score vector per gate site, starts open, learns on a fixed batch."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import GENERATOR

from gencnp_jax.method import evidence, losses
from gencnp_jax.models import classifiers, daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator
from gencnp_jax.models.generator import Generator

IMAGES = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))


@functools.cache
def _classifier(name, widths):
    """Built once per architecture: building is the slow part on two CPU cores."""
    classifier = classifiers.make_classifier(name, widths, 10, 1)
    return classifier, classifier(IMAGES)[1]


def _setup(name, widths, cell="gru"):
    classifier, features = _classifier(name, widths)
    kwargs = {**GENERATOR, "cell": cell}
    generator = Generator(classifier.site_channels, 10, **kwargs, rngs=nnx.Rngs(1))
    return classifier, features, generator


@pytest.mark.parametrize(
    "name,widths,cell",
    [("vgg", (8, 16, 16, 16), "gru"), ("resnet", (8, 16, 16), "lstm"), ("vgg", (8, 16), "mlp")],
)
def test_one_score_vector_per_site(name, widths, cell):
    classifier, features, generator = _setup(name, widths, cell)
    scores, q_logits = generator(features)
    assert list(scores) == list(classifier.site_channels)
    for site, c in classifier.site_channels.items():
        chex.assert_shape(scores[site], (4, c))
    chex.assert_shape(q_logits, (4, 10))
    graphdef, state = nnx.split(generator)
    pathway = jax.jit(lambda g, f: g.pathway(f, daq.Settings.create(2.0, 2.0)))
    scores, gates, _ = pathway(FrozenGenerator(graphdef, state), features)
    assert set(gates) == set(classifier.site_channels)
    for site, c in classifier.site_channels.items():
        chex.assert_shape(gates[site], (4, c))
        assert set(np.unique(np.asarray(gates[site])).tolist()) <= {0.0, 1.0}
    # Gates start mostly open (the heads' bias is logit(init_open) = 0.85, plus noise)
    assert float(losses.sparsity(scores)) > 0.6
    assert float(jnp.mean(jnp.concatenate([g.ravel() for g in gates.values()]))) > 0.6


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown recurrent cell"):
        Generator({"a/b": 4}, 3, **{**GENERATOR, "cell": "transformer"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown pooling"):
        Generator({"a/b": 4}, 3, **{**GENERATOR, "pooling": ("median",)}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="hidden"):  # no default of its own: the config's
        Generator({"a/b": 4}, 3, rngs=nnx.Rngs(0))


def test_features_get_no_gradient():
    _, features, generator = _setup("vgg", (8, 16, 16, 16))
    grads = jax.grad(lambda f: losses.sparsity(generator(f)[0]))(features)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))


def test_optimiser_steps_lower_the_loss():
    classifier, features, generator = _setup("vgg", (8, 16, 16, 16))
    clf_graphdef, clf_state = nnx.split(classifier)
    full_logits = classifiers.forward(clf_graphdef, clf_state, IMAGES)[0]
    optimizer = nnx.Optimizer(generator, optax.adam(3e-2), wrt=nnx.Param)

    def loss_fn(generator):
        scores, _ = generator(features)
        gates = daq.Settings.create(2.0, 2.0).binarize(scores)
        pathway_logits = classifiers.forward(clf_graphdef, clf_state, IMAGES, gates)[0]
        kd = losses.distillation_kl(full_logits, pathway_logits, 1.0)
        return kd + 0.5 * losses.sparsity(scores)

    @nnx.jit
    def step(generator, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(generator)
        optimizer.update(generator, grads)
        return loss

    first = float(step(generator, optimizer))
    for _ in range(15):
        last = float(step(generator, optimizer))
    assert np.isfinite(last) and last < first


def test_channel_evidence_lets_each_gate_see_its_own_channel():
    classifier, features, _ = _setup("vgg", (8, 16, 16, 16))
    generator = Generator(classifier.site_channels, 10, **GENERATOR, rngs=nnx.Rngs(1))
    site, i = list(classifier.site_channels)[1], 1
    pooled = jnp.concatenate([features[site].mean((1, 2)), features[site].max((1, 2))], -1)
    mean, std = pooled.mean(0), pooled.std(0) + 0.1
    generator.set_pool_stats(
        {s: (0.0, 1.0) for s in classifier.site_channels} | {site: (mean, std)}
    )
    # With the decoder's kernel at zero, a gate logit is its bias plus its channel's evidence.
    head = generator.score_heads[i]
    head.kernel.value = jnp.zeros_like(head.kernel.value)
    scores, _ = generator(features)
    z = ((pooled - mean) / std).reshape(pooled.shape[0], 2, -1)
    alpha_beta = generator.evidence[i].value
    expected = jax.nn.sigmoid(head.bias.value + (z * alpha_beta[None]).sum(1))
    np.testing.assert_allclose(scores[site], expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(scores[site], axis=0).mean()) > 0.01  # varies with the input


def _frozen(name, widths, fills=None):
    classifier, _ = _classifier(name, widths)
    graphdef, state = nnx.split(classifier)
    return FrozenClassifier(graphdef, state, classifier.site_channels, 10).with_fills(fills)


def test_first_order_effects_are_the_cost_of_closing_each_gate_a_little():
    channels = _classifier("vgg", (8, 16, 16, 16))[0].site_channels
    fills = {s: jax.random.normal(jax.random.key(3), (c,)) for s, c in channels.items()}
    frozen = _frozen("vgg", (8, 16, 16, 16), fills)
    logits, features, fo = evidence.first_order_effects(frozen, IMAGES)
    chex.assert_trees_all_close((logits, features), frozen.classify(IMAGES))
    flat = gates_lib.flatten(fo)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(flat**2, -1)), 1.0, rtol=1e-5)
    # closing gate k by eps costs the predicted class about eps * fo_k * (the row's RMS)
    classes = jnp.argmax(logits, -1)
    eps, ratios = 1e-2, []
    for site in list(channels)[1:3]:
        for k in np.argsort(-np.abs(np.asarray(fo[site][0])))[:2]:
            gates = {s: jnp.ones((4, c)) for s, c in channels.items()}
            gates[site] = gates[site].at[:, k].set(1.0 - eps)
            closed = frozen.logits(IMAGES, gates)
            cost = jnp.take_along_axis(logits - closed, classes[:, None], -1)[:, 0] / eps
            ratios.append(np.asarray(cost / fo[site][:, k])[0])
    assert min(ratios) > 0  # the sign: supporting channels cost when closed
    np.testing.assert_allclose(ratios, np.mean(ratios), rtol=0.05)  # one scale: the row's RMS


def test_a_generator_that_reads_gradients_needs_and_uses_them():
    classifier, features, _ = _setup("vgg", (8, 16, 16, 16))
    kwargs = {**GENERATOR, "grad_evidence": True, "rank_head": True}
    generator = Generator(classifier.site_channels, 10, **kwargs, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="first-order effects"):
        generator(features)
    fo = {
        s: jax.random.normal(jax.random.key(2), (4, c)) for s, c in classifier.site_channels.items()
    }
    site = list(fo)[0]
    moved = {**fo, site: fo[site].at[:, 0].add(3.0)}
    out, out_moved = generator.outputs(features, fo), generator.outputs(features, moved)
    assert not np.allclose(out["gate"][site], out_moved["gate"][site])
    assert not np.allclose(out["rank"][site], out_moved["rank"][site])
    # the rank head orders the channels; the gate head decides the pathway
    chex.assert_trees_all_equal(generator.ranking(features, fo), out["rank"])
    assert not np.allclose(out["rank"][site], out["gate"][site])
    plain = Generator(classifier.site_channels, 10, **GENERATOR, rngs=nnx.Rngs(1))
    chex.assert_trees_all_equal(plain.ranking(features), plain.logits(features)[0])
