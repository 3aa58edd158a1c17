"""GEN-CNP's own metrics on a split (agreement, density, mDC, mIC, leakage), as
`train_generator` writes them to `generator/metrics.json`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gencnp_jax.context import inputs
from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, sharding
from gencnp_jax.method import explain
from gencnp_jax.models import daq
from gencnp_jax.models import gates as gates_lib
from gencnp_jax.models.frozen import FrozenClassifier, FrozenGenerator


@jax.jit
def pathway_outputs(generator, classifier, images, settings: daq.Settings) -> dict:
    """The per-instance outputs of GEN-CNP on a batch that the metrics need (jitted)."""
    p = explain.explain(generator, classifier, images, settings)
    partner, has_partner = metrics.different_class_partners(p.explained_class)
    partner_logits = classifier.logits(images[partner], p.gates)
    return {
        "full_logits": p.full_logits,
        "pathway_logits": p.pathway_logits,
        "classes": p.explained_class,
        "gates_flat": gates_lib.flatten(p.gates),
        "partner_logits": partner_logits,
        "partner_classes": p.explained_class[partner],
        "has_partner": has_partner,
    }


def evaluate_split(
    config, generator: FrozenGenerator, classifier: FrozenClassifier, split, mesh
) -> dict:
    """agreement, density, mDC, mIC and leakage of GEN-CNP pathways on a split."""
    g = config.generator
    settings = daq.Settings.create(g.daq.temperature, g.daq.sigma)
    generator, classifier = sharding.replicate(mesh, (generator, classifier))
    cols = batched.map_batches(
        lambda images: pathway_outputs(generator, classifier, images, settings),
        lambda idx: inputs.normalize(config, split.images[idx]),
        len(split.labels),
        config.train.eval_batch_size,
        mesh,
    )
    c = {k: jnp.asarray(v) for k, v in cols.items()}
    density_B = jnp.mean(c["gates_flat"], axis=-1)
    pairs = c["has_partner"]
    return {
        "num_examples": int(len(split.labels)),
        "agreement": float(metrics.agreement(c["full_logits"], c["pathway_logits"])),
        "density_mean": float(jnp.mean(density_B)),
        "density_std": float(jnp.std(density_B)),
        "mDC": float(metrics.mDC(c["full_logits"], c["pathway_logits"])),
        "mIC": float(metrics.mIC(c["full_logits"], c["pathway_logits"])),
        "leakage": float(
            metrics.leakage(c["partner_logits"], c["classes"], c["partner_classes"], pairs)
        ),
    }
