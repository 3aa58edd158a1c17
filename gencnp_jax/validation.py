"""Config checks that fail fast with one clear message, before any JAX work.

Each error names the config field and the values it accepts.
"""

from __future__ import annotations

from gencnp_jax import classifiers


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check_config(config) -> None:
    """Raises ConfigError for unknown names and impossible sizes."""
    c = config.classifier
    if c.name not in classifiers.CLASSIFIERS:
        raise ConfigError(
            f"config.classifier.name={c.name!r} is unknown: choose one of {classifiers.CLASSIFIERS}"
        )
    if not c.widths or any(int(w) <= 0 for w in c.widths):
        raise ConfigError(f"config.classifier.widths={tuple(c.widths)} must be positive ints")
    for section in ("classifier", "generator"):
        bs = config[section].batch_size
        if bs <= 0:
            raise ConfigError(f"config.{section}.batch_size={bs} must be positive")
    if c.dropout_mode not in ("fixed", "variable"):
        raise ConfigError(
            f"config.classifier.dropout_mode={c.dropout_mode!r}: choose 'fixed' or 'variable'"
        )
    if config.generator.ablation not in ("zero", "mean"):
        raise ConfigError(
            f"config.generator.ablation={config.generator.ablation!r}: choose 'zero' or 'mean'"
        )
    if config.bank.class_source not in ("prediction", "label"):
        raise ConfigError(
            f"config.bank.class_source={config.bank.class_source!r}: choose 'prediction' or 'label'"
        )
