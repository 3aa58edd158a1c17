"""GEN-CNP's own metrics on a split (agreement, density, mDC, mIC, leakage), as
`train_generator` writes them to `generator/metrics.json`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gencnp_jax.context import inputs
from gencnp_jax.eval import metrics
from gencnp_jax.io import batched, sharding
from gencnp_jax.method import explain
from gencnp_jax.models import classifiers
from gencnp_jax.models import gates as gates_lib


def pathway_outputs(gen_graphdef, cls_graphdef):
    """A jitted fn of `(gen_state, cls_state, images, temperature, sigma, fills)`: the
    per-instance outputs of GEN-CNP on a batch that the metrics need."""

    def fn(gen_state, cls_state, images, temperature, sigma, fills):
        p = explain.explain(
            gen_graphdef, gen_state, cls_graphdef, cls_state, images, temperature, sigma, fills
        )
        partner, has_partner = metrics.different_class_partners(p.explained_class)
        partner_logits, _ = classifiers.forward(
            cls_graphdef, cls_state, images[partner], p.gates, fills
        )
        return {
            "full_logits": p.full_logits,
            "pathway_logits": p.pathway_logits,
            "classes": p.explained_class,
            "gates_flat": gates_lib.flatten(p.gates),
            "partner_logits": partner_logits,
            "partner_classes": p.explained_class[partner],
            "has_partner": has_partner,
        }

    return jax.jit(fn)


def evaluate_split(config, classifier, gen_graphdef, gen_state, fills, split, mesh) -> dict:
    """agreement, density, mDC, mIC and leakage of GEN-CNP pathways on a split."""
    g = config.generator
    fn = pathway_outputs(gen_graphdef, classifier.graphdef)
    gen_state, cls_state, fills = sharding.replicate(mesh, (gen_state, classifier.state, fills))
    temperature, sigma = jnp.float32(g.daq.temperature), jnp.float32(g.daq.sigma)
    cols = batched.map_batches(
        lambda images: fn(gen_state, cls_state, images, temperature, sigma, fills),
        lambda idx: inputs.normalize(config, split.images[idx]),
        len(split.labels),
        g.eval_batch_size,
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
