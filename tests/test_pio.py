"""Per-instance optimised masks (PIO) and their distillation into the generator."""

import copy
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gencnp_jax.context import inputs, loading
from gencnp_jax.method import losses, objective, pio
from gencnp_jax.stages import validation
from gencnp_jax.train import generator as train_generator
from gencnp_jax.train import pio_targets


def _hp(**changes):
    values = dict(
        steps=40,
        learning_rate=0.1,
        density_weight=2.0,
        leak_weight=1.0,
        leak_margin=1.0,
        init_logit=3.0,
    )
    return pio.PioHParams.create(**{**values, **changes})


def _gates(cls, masks_flat):
    sites = sorted(cls.site_channels)
    splits = np.cumsum([cls.site_channels[s] for s in sites])[:-1]
    return dict(zip(sites, jnp.split(masks_flat, splits, axis=1), strict=True))


@pytest.fixture(scope="module")
def setup(tiny_config, trained_workdir):
    cls = loading.load_classifier(tiny_config, trained_workdir)
    train = inputs.load_data(tiny_config, "train")
    images = jnp.asarray(inputs.normalize(tiny_config, train.images[:32]))
    classify = lambda x, g=None: cls.classify(x, g)
    run = jax.jit(lambda x, hp: pio.optimise_masks(cls, x, hp))
    return cls, classify, run, images


def test_masks_are_binary_and_give_the_pathway_logits(setup):
    cls, classify, run, images = setup
    out = run(images, _hp())
    masks = out["masks_flat"]
    chex.assert_shape(masks, (32, sum(cls.site_channels.values())))
    assert set(np.unique(np.asarray(masks))) <= {0.0, 1.0}
    chex.assert_trees_all_equal(masks, (out["logits_flat"] > 0).astype(masks.dtype))
    chex.assert_trees_all_close(
        classify(images, _gates(cls, masks))[0], out["pathway_logits"], atol=1e-4
    )
    chex.assert_trees_all_close(classify(images)[0], out["full_logits"], atol=1e-4)


def test_without_sparsity_the_masks_stay_open_and_faithful(setup):
    # KL(p || p~) is 0 at the full model: alone, it keeps (almost) every gate open. Adam's
    # normalised steps may still close a gate whose gradient is tiny but steady.
    _, _, run, images = setup
    s = pio_targets.summary(run(images, _hp(density_weight=0.0, leak_weight=0.0)))
    assert s["density_mean"] > 0.9 and s["agreement"] == 1.0, s


def test_sparsity_weight_trades_density_for_faithfulness(setup):
    _, _, run, images = setup
    light, heavy = run(images, _hp(density_weight=0.5)), run(images, _hp(density_weight=8.0))
    s_light, s_heavy = pio_targets.summary(light), pio_targets.summary(heavy)
    assert s_heavy["density_mean"] < s_light["density_mean"] < 1.0
    assert s_light["agreement"] >= s_heavy["agreement"]
    assert s_light["density_std"] > 0.0  # each image gets its own mask


def test_mask_bce_is_the_binary_cross_entropy_and_is_least_at_the_target():
    t = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    s = jnp.array([[0.9, 0.2, 0.6, 0.5]])
    want = -np.mean(np.log([0.9, 0.8, 0.6, 0.5]))
    np.testing.assert_allclose(losses.mask_bce(s, t), want, rtol=1e-6)
    assert float(losses.mask_bce(t * 0.98 + 0.01, t)) < float(losses.mask_bce(s, t))
    grad_t = jax.grad(lambda t: losses.mask_bce(s, t))(t)
    chex.assert_trees_all_equal(grad_t, jnp.zeros_like(t))  # targets are stop-gradient


def test_distill_term_learns_fixed_targets(tiny_config, setup):
    cls, _, run, images = setup
    config = copy.deepcopy(tiny_config)
    targets = run(images, _hp())["masks_flat"]
    gen_graphdef, tx, state = train_generator.init_state(config, cls)
    hp, weights = train_generator.hparams_from_config(config.generator)
    weights = weights.replace(distill=jnp.float32(50.0))
    step = train_generator.make_train_step(gen_graphdef, tx, weights.active())
    generator = nnx.merge(gen_graphdef, state.model_state())
    _, pools, fo = objective.read(generator, cls, images[:16])
    batch = {"images": images, "target_masks": targets[:16], "target_pools": pools, "target_fo": fo}
    seen = []
    for i in range(6):
        state, out = step(state, dict(batch), jnp.int32(i), cls, weights, hp)
        seen.append(float(out["loss/distill"]))
    assert seen[-1] < 0.8 * seen[0], seen
    _, plain = step(state, images, jnp.int32(7), cls, weights, hp)
    assert "loss/distill" not in plain  # no targets, no term


def test_targets_are_cached_by_chunk_and_recomputed_when_settings_change(
    tiny_config, trained_workdir, tmp_path, capsys
):
    config = copy.deepcopy(tiny_config)
    config.generator.pio.steps = 3
    config.generator.pio.trim_kl_budget = 0.0  # the cached masks as they are
    cls = loading.load_classifier(config, trained_workdir)
    train = inputs.load_data(config, "train")
    mesh = inputs.make_mesh(config)
    cache = str(tmp_path / "pio")
    first = pio_targets.compute(config, cls, train, mesh, cache)
    assert len(first.indices) == config.generator.pio.num_images
    assert len(np.unique(first.indices)) == len(first.indices)
    chunk = os.path.join(cache, "chunk_0000000.npz")
    with np.load(chunk) as z:  # a cached chunk is what the next run reads back
        masks = z["masks_flat"].copy()
    np.savez(chunk, **{**dict(np.load(chunk)), "masks_flat": 1.0 - masks})
    again = pio_targets.compute(config, cls, train, mesh, cache)
    np.testing.assert_array_equal(again.masks_flat, 1.0 - first.masks_flat)
    config.generator.pio.target_temperature = 2.0  # read when learning: the masks stay
    pio_targets.compute(config, cls, train, mesh, cache)
    assert "settings changed" not in capsys.readouterr().out
    config.generator.pio.steps = 4
    fresh = pio_targets.compute(config, cls, train, mesh, cache)
    assert "settings changed" in capsys.readouterr().out
    assert not np.array_equal(fresh.masks_flat, again.masks_flat)


def test_soft_targets_keep_the_masks_and_the_teachers_ranking():
    logits = np.array([[-4.0, -0.5, 0.5, 2.0, 6.0], [3.0, -3.0, 0.1, -0.1, 1.0]], np.float32)
    masks = (logits > 0).astype(np.float32)
    targets = pio_targets.Targets(np.arange(2), masks, logits, np.zeros(2, np.float32), {})
    np.testing.assert_array_equal(targets.distill_targets(0.0), masks)
    for temperature in (0.5, 4.0):
        soft = targets.distill_targets(temperature)
        assert soft.dtype == np.float32 and np.all((soft > 0) & (soft < 1))
        np.testing.assert_array_equal(soft > 0.5, masks > 0)  # same mask at threshold 0.5
        np.testing.assert_array_equal(np.argsort(soft, -1), np.argsort(logits, -1))
    hot, cool = targets.distill_targets(4.0), targets.distill_targets(0.5)
    assert np.all(np.abs(hot - 0.5) < np.abs(cool - 0.5))  # a higher T is softer
    cuts = np.array([1.0, -0.05], np.float32)  # trimmed: 0.5 sits at each row's cut
    trimmed = pio_targets.Targets(np.arange(2), (logits > cuts[:, None]) * 1.0, logits, cuts, {})
    np.testing.assert_array_equal(trimmed.distill_targets(1.0) > 0.5, trimmed.masks_flat > 0)


def test_trimming_keeps_the_sparsest_faithful_prefix_of_the_ranking(setup):
    cls, classify, run, images = setup
    logits = run(images, _hp())["logits_flat"]
    densities = jnp.arange(1, 51) / 50.0
    trim = jax.jit(lambda budget: pio.sparsest_cuts(cls, images, logits, densities, budget))
    tight, loose = trim(jnp.float32(0.02)), trim(jnp.float32(10.0))
    full = classify(images)[0]
    for out in (tight, loose):
        masks = np.asarray(out["masks_flat"])
        kept_min = np.where(masks > 0, np.asarray(logits), np.inf).min(-1)
        dropped_max = np.where(masks > 0, -np.inf, np.asarray(logits)).max(-1)
        assert np.all(kept_min > dropped_max)  # a prefix of the logit ranking
        chex.assert_trees_all_equal(out["pathway_logits"].argmax(-1), full.argmax(-1))
        pred = full.argmax(-1)
        partner, has_partner = losses.partner_indices(pred)
        leaks = has_partner & (out["partner_logits"].argmax(-1) == pred)
        assert not np.any(leaks)  # the leakage guard holds on the trimmed masks too
        chex.assert_trees_all_close(
            out["partner_logits"],
            classify(images[partner], _gates(cls, out["masks_flat"]))[0],
            atol=1e-4,
        )
    kl_B = losses.kl_rows(full, tight["pathway_logits"])
    dense = np.asarray(tight["masks_flat"]).mean(-1) == 1.0  # the grid's last: may miss
    assert np.all((np.asarray(kl_B) <= 0.02 + 1e-6) | dense)
    d_tight, d_loose = (np.asarray(o["masks_flat"]).mean(-1) for o in (tight, loose))
    assert np.all(d_loose <= d_tight) and d_loose.mean() < d_tight.mean()
    assert d_loose.std() > 0.0  # each image its own density


def test_generator_run_reports_its_pio_targets(generator_workdir):
    with open(os.path.join(generator_workdir, "generator", "metrics.json")) as f:
        m = json.load(f)
    p = m["pio_targets"]
    assert p["num_images"] == 64 and 0.0 < p["density_mean"] < 1.0
    assert os.path.exists(os.path.join(generator_workdir, "generator", "pio_targets"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("per_step", 128, "pio.per_step=128 is above"),
        ("per_step", 15, "generator.pio.per_step=15 does not split"),
        ("steps", 0, "config.generator.pio.steps=0 must be a positive int"),
        (
            "steps",
            6,
            r"steps \* learning_rate = 6 \* 0.5 does not exceed the gates' initial logit 3.0",
        ),
        ("target_temperature", -1.0, "pio.target_temperature=-1.0 must be >= 0"),
        ("trim_kl_budget", -0.1, "pio.trim_kl_budget=-0.1 must be >= 0"),
    ],
)
def test_bad_pio_settings_are_named(tiny_config, field, value, message, monkeypatch):
    monkeypatch.setattr(validation.jax, "device_count", lambda: 2)  # as launch.py's CPU mesh
    config = copy.deepcopy(tiny_config)
    config.generator.pio[field] = value
    with pytest.raises(validation.ConfigError, match=message):
        validation.check_config(config)
    config.generator.loss.w_distill = 0.0  # off: its settings are not read
    validation.check_config(config)
