"""Config checks that fail fast with one clear message, before any training or data work.

Each error names the config field and the values it accepts.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from gencnp_jax.context import user_model
from gencnp_jax.io import custom_data, data, weights
from gencnp_jax.method import pio
from gencnp_jax.models import classifiers, generator


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


# Fields that must be positive integers (a zero `log_every` would divide by zero mid-run).
_POSITIVE = {
    "train": ("batch_size", "eval_batch_size", "checkpoint_every", "log_every"),
    "generator": ("steps",),
    "eval": ("batch_size",),
    "bank": ("samples_per_class",),
}
# Batches split over the devices of the mesh: they must be multiples of its size.
_SHARDED_BATCHES = (("train", "batch_size"), ("train", "eval_batch_size"), ("eval", "batch_size"))
_PIO_INTS = ("num_images", "per_step", "batch_size", "steps")  # config.generator.pio
_PIO_BATCHES = ("per_step", "batch_size")


def check_config(config) -> None:
    """Raises ConfigError for unknown names, impossible sizes and unknown gate sites."""
    c = config.classifier
    if user_model.uses_factory(config):
        pass  # the user's model: checked below, once the dataset's shape is known
    elif c.name not in classifiers.CLASSIFIERS:
        raise ConfigError(
            f"config.classifier.name={c.name!r} is unknown: choose one of {classifiers.CLASSIFIERS}"
        )
    elif not c.widths or any(int(w) <= 0 for w in c.widths):
        raise ConfigError(f"config.classifier.widths={tuple(c.widths)} must be positive ints")
    for section, fields in _POSITIVE.items():
        for field in fields:
            value = config[section][field]
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.{section}.{field}={value!r} must be a positive int")
    limit, held_out = config.data.train_limit, config.data.validation_size
    if not isinstance(held_out, int) or held_out < 0:
        raise ConfigError(f"config.data.validation_size={held_out!r} must be an int >= 0")
    if 0 < limit < config.train.batch_size + held_out:
        raise ConfigError(
            f"config.data.train_limit={limit} leaves {limit - held_out} training images beside "
            f"config.data.validation_size={held_out}, fewer than config.train.batch_size="
            f"{config.train.batch_size}: raise the limit (0 = the whole split), or lower the "
            f"validation size or the batch size"
        )
    _check_eval(config.eval)
    if not c.epochs > 0:
        raise ConfigError(f"config.classifier.epochs={c.epochs!r} must be positive")
    g = config.generator
    if g.ablation not in ("zero", "mean"):
        raise ConfigError(f"config.generator.ablation={g.ablation!r}: choose 'zero' or 'mean'")
    if g.model.cell not in generator.CELLS:
        raise ConfigError(
            f"config.generator.model.cell={g.model.cell!r}: choose one of {generator.CELLS}"
        )
    pooling = tuple(g.model.pooling)
    if not pooling or any(p not in generator.POOLINGS for p in pooling):
        raise ConfigError(
            f"config.generator.model.pooling={pooling}: choose one or more of {generator.POOLINGS}"
        )
    _check_pio(g)
    _check_ranked(g.loss)
    if config.bank.class_source not in ("prediction", "label"):
        raise ConfigError(
            f"config.bank.class_source={config.bank.class_source!r}: choose 'prediction' or 'label'"
        )
    if not 0.0 <= config.bank.threshold <= 1.0:
        raise ConfigError(f"config.bank.threshold={config.bank.threshold!r} must be in [0, 1]")
    _check_devices(config)
    hwc, num_classes = _dataset_info(config)
    try:
        data.parse_normalization(config.data.normalization, hwc[-1])
    except ValueError as err:
        raise ConfigError(f"config.data.{err}") from None
    _check_sites(config, hwc, num_classes)


def _check_eval(e) -> None:
    """The evaluation's densities, ablations and references."""
    densities = tuple(e.densities)
    if not densities or not all(0 < d < 1 for d in densities):
        raise ConfigError(f"config.eval.densities={densities!r} must lie in (0, 1)")
    ablations = tuple(e.ablations)
    if not ablations or any(a not in ("mean", "zero") for a in ablations):
        raise ConfigError(
            f"config.eval.ablations={ablations!r}: choose one or both of ('mean', 'zero'), the "
            f"headline first"
        )
    for field, least in (
        ("reference_examples", 1),
        ("reference_steps", 0),
        ("control_examples", 1),
    ):
        if not isinstance(e[field], int) or e[field] < least:
            raise ConfigError(f"config.eval.{field}={e[field]!r} must be an int >= {least}")


def _check_ranked(loss) -> None:
    """The ``ranked`` terms' weights and density range."""
    span = tuple(loss.ranked_density)
    if not loss.w_ranked >= 0:
        raise ConfigError(f"config.generator.loss.w_ranked={loss.w_ranked!r} must be >= 0")
    if len(span) != 2 or not 0 < span[0] <= span[1] < 1:
        raise ConfigError(
            f"config.generator.loss.ranked_density={span!r} must be "
            f"(low, high) with 0 < low <= high < 1"
        )


def _check_pio(g) -> None:
    """The PIO targets' sizes (only when the distill term is on)."""
    if g.loss.w_distill < 0:
        raise ConfigError(f"config.generator.loss.w_distill={g.loss.w_distill!r} must be >= 0")
    if not g.loss.w_rank >= 0:
        raise ConfigError(f"config.generator.loss.w_rank={g.loss.w_rank!r} must be >= 0")
    if g.loss.w_distill == 0:
        return
    for field in _PIO_INTS:
        value = g.pio[field]
        if not isinstance(value, int) or value < (0 if field == "num_images" else 1):
            raise ConfigError(f"config.generator.pio.{field}={value!r} must be a positive int")
    p = g.pio
    if p.steps * p.learning_rate <= pio.INIT_LOGIT:  # Adam moves a logit <= lr per step
        raise ConfigError(
            f"config.generator.pio: steps * learning_rate = {p.steps} * {p.learning_rate} does "
            f"not exceed the gates' initial logit {pio.INIT_LOGIT}: no gate could close; raise "
            f"steps or "
            f"learning_rate"
        )
    if not p.target_temperature >= 0:
        raise ConfigError(
            f"config.generator.pio.target_temperature={p.target_temperature!r} must be >= 0 "
            f"(0: 0/1 targets; T > 0: sigmoid(logit / T))"
        )
    if not p.trim_kl_budget >= 0:
        raise ConfigError(
            f"config.generator.pio.trim_kl_budget={p.trim_kl_budget!r} must be >= 0 (0: off)"
        )
    if 0 < g.pio.num_images < g.pio.per_step:
        raise ConfigError(
            f"config.generator.pio.per_step={g.pio.per_step} is above config.generator.pio."
            f"num_images={g.pio.num_images}: lower it or compute more masks"
        )


def _check_devices(config) -> None:
    visible = jax.device_count()
    n = config.num_devices or visible
    if n < 0 or n > visible:
        raise ConfigError(
            f"config.num_devices={config.num_devices} but {visible} devices are visible: "
            f"choose 1..{visible}, or 0 for all of them"
        )
    values = {f"{section}.{field}": config[section][field] for section, field in _SHARDED_BATCHES}
    if config.generator.loss.w_distill > 0 and config.generator.pio.num_images > 0:
        values.update({f"generator.pio.{f}": config.generator.pio[f] for f in _PIO_BATCHES})
    for name, value in values.items():
        if value % n:
            raise ConfigError(
                f"config.{name}={value} does not split over {n} devices: choose a "
                f"multiple of {n} (or set config.num_devices)"
            )


def _dataset_info(config) -> tuple[tuple[int, int, int], int]:
    name = config.data.dataset
    try:
        return data.dataset_info(name, os.path.expanduser(config.data.data_dir))
    except data.DatasetError as err:
        if custom_data.is_custom(name):  # the message already says how to fix the files
            raise ConfigError(f"config.data.dataset={name!r}: {err}") from None
        raise ConfigError(
            f"config.data.dataset={name!r} cannot be used ({err}): choose fashion_mnist, "
            f"mnist, cifar10 or another TFDS dataset prepared in config.data.data_dir"
        ) from None


def _user_sites(config, hwc, num_classes) -> list[str]:
    """The sites of the user's model, built, loaded and gated as the stages will."""
    c = config.classifier
    if not c.checkpoint:
        raise ConfigError(
            f"config.classifier.factory={c.factory!r} needs config.classifier.checkpoint (an "
            f"orbax directory, .npz or .msgpack of its weights): the pipeline trains only the "
            f"built-in classifiers; save yours with gencnp_jax.save_weights(model, 'w.npz')"
        )
    try:
        return list(user_model.build_gated(config, hwc, num_classes).site_channels)
    except (user_model.UserModelError, weights.WeightsError) as err:
        raise ConfigError(str(err)) from None


def _check_sites(config, hwc, num_classes) -> None:
    """The user's model (factory) must build, load and attach; gate sites named in the
    config must be sites of the configured classifier."""
    site = config.eval.gradcam_site
    if user_model.uses_factory(config):
        sites = _user_sites(config, hwc, num_classes)
    elif not site:
        return
    else:
        c = config.classifier
        model = nnx.eval_shape(  # shapes only: free
            lambda: classifiers.make_classifier(
                c.name, tuple(c.widths), num_classes, hwc[-1], c.depth, seed=0
            )
        )
        sites = list(model.site_channels)
    if not site:
        return
    if site not in sites:
        raise ConfigError(
            f"config.eval.gradcam_site={site!r} is not a gate site of this classifier: "
            f"choose one of {sites} (or '' for the last)"
        )


def small_data(config, sizes: dict[str, int]) -> str | None:
    """One line naming each config field larger than the data it counts, with the value the
    stages use in its place (they take what there is), e.g. ``"small data (512 training, 64
    validation, 128 test images): generator.stats_examples 5000 -> 512, ..."``; None when
    nothing is clamped. (The bank names its classes with fewer than
    ``bank.samples_per_class`` samples itself.)

    Args:
      config: the run's config.
      sizes: `inputs.split_sizes`: images per split.

    Raises:
      ConfigError: ``data.validation_size`` leaves fewer training images than a batch.
    """
    train, val, test = sizes["train"], sizes["validation"], sizes["test"]
    d, e, g = config.data, config.eval, config.generator
    if train < config.train.batch_size:
        raise ConfigError(
            f"config.data.validation_size={d.validation_size} leaves {train} of the "
            f"{train + val} training images to train on, fewer than config.train.batch_size="
            f"{config.train.batch_size}: lower it (e.g. {(train + val) // 10})"
        )
    clamped = []

    def clamp(name: str, value: int, available: int, unit: str = "") -> int:
        if value > available:
            clamped.append(f"{name} {value} -> {available}{unit}")
        return min(value, available)

    clamp("generator.stats_examples", g.stats_examples, train)
    if g.loss.w_distill > 0:
        clamp("generator.pio.num_images", g.pio.num_images, train)
    clamp("eval.control_examples", e.control_examples, train)
    n = test
    if e.num_examples:
        n = min(e.num_examples, test)
        if e.num_examples > min(test, val):
            clamped.append(
                f"eval.num_examples {e.num_examples} -> {n} test / {min(e.num_examples, val)} "
                f"validation images"
            )
    if e.auc_examples:
        clamp("eval.auc_examples", e.auc_examples, n)
    clamp("eval.reference_examples", e.reference_examples, n)
    if not clamped:
        return None
    return f"small data ({train} training, {val} validation, {test} test images): " + ", ".join(
        clamped
    )
