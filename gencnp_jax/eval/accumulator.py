"""Exact metric reduction over padded eval batches: per-instance values and weights per batch,
collected on the host and reduced once (`MetricAccumulator`, `summarize`).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.eval import metrics
from gencnp_jax.models import gates as gates_lib

PerInstance = dict[str, tuple[jax.Array, jax.Array]]  # name -> (values f32[B], weights f32[B])


@flax.struct.dataclass
class Outputs:
    """What the classifier answered under a batch's masks; any field may be None (absent).

    Attributes:
      pathway_logits_BxK: ``H(x; P(x))`` (or, with `pathway_classes_B`, ``H(x; P_k)``).
      complement_logits_BxK: ``H(x; 1 - P(x))`` (necessity).
      partner_logits_BxK, partner_classes_B: ``H(x'; P(x))`` and ``c(x')`` (leakage).
      null_logits_BxK: ``H(0; P(x))`` (null confidence).
      deletion_auc_B, insertion_auc_B: per-instance AUCs (`perturbation`).
      pathway_classes_B: the class ``k`` whose class pathway row i was explained by.
    """

    pathway_logits_BxK: jax.Array | None = None
    complement_logits_BxK: jax.Array | None = None
    partner_logits_BxK: jax.Array | None = None
    partner_classes_B: jax.Array | None = None
    null_logits_BxK: jax.Array | None = None
    deletion_auc_B: jax.Array | None = None
    insertion_auc_B: jax.Array | None = None
    pathway_classes_B: jax.Array | None = None


def instance_metrics(
    full_logits_BxK: jax.Array,
    outputs: Outputs,
    gates: Mapping[str, jax.Array] | None = None,
    classes_B: jax.Array | None = None,
    valid_B: jax.Array | None = None,
) -> PerInstance:
    """Per-instance values and weights whose weighted means are the `metrics` functions (jit-able).

    Keys present depend on the `outputs` given: ``mIC, mDC, agreement`` (pathway logits),
    ``density`` and ``density/<site>`` (gates), ``necessity_drop`` (complement logits),
    ``leakage`` (``H(x'; P(x))`` and ``c(x')``), ``null_confidence`` (``H(0; P(x))``),
    ``deletion_auc, insertion_auc`` (per-instance AUCs from `perturbation`). Transfer: with
    ``pathway_classes_B`` (row i explained by class pathway ``k_i``, the pathway logits
    ``H(x; P_k)``), ``mIC, mDC, agreement`` weigh only rows with ``k = c`` and
    ``class_leakage, other_class_drop`` only rows with ``k != c``.
    """
    o = outputs
    pathway_logits_BxK, pathway_classes_B = o.pathway_logits_BxK, o.pathway_classes_B
    complement_logits_BxK, null_logits_BxK = o.complement_logits_BxK, o.null_logits_BxK
    partner_logits_BxK, partner_classes_B = o.partner_logits_BxK, o.partner_classes_B
    deletion_auc_B, insertion_auc_B = o.deletion_auc_B, o.insertion_auc_B
    c_B = metrics.explained_classes(full_logits_BxK, classes_B)
    w_B = jnp.ones(c_B.shape, jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
    out: PerInstance = {}
    if pathway_logits_BxK is not None:
        same_w_B = w_B if pathway_classes_B is None else w_B * (pathway_classes_B == c_B)
        out["mIC"] = (metrics.increase_B(full_logits_BxK, pathway_logits_BxK, c_B), same_w_B)
        out["mDC"] = (metrics.drop_B(full_logits_BxK, pathway_logits_BxK, c_B), same_w_B)
        out["agreement"] = (metrics.agreement_B(full_logits_BxK, pathway_logits_BxK), same_w_B)
    if pathway_logits_BxK is not None and pathway_classes_B is not None:
        out["class_leakage"] = metrics.class_leakage_B(
            pathway_logits_BxK, pathway_classes_B, c_B, w_B
        )
        out["other_class_drop"] = metrics.other_class_drop_B(
            full_logits_BxK, pathway_logits_BxK, pathway_classes_B, c_B, w_B
        )
    if gates is not None:
        out["density"] = (gates_lib.density(gates), w_B)
        for site, d_B in gates_lib.site_density(gates).items():
            out[f"density/{site}"] = (d_B, w_B)
    if complement_logits_BxK is not None:
        out["necessity_drop"] = (
            metrics.relative_drop(full_logits_BxK, complement_logits_BxK, c_B),
            w_B,
        )
    if partner_logits_BxK is not None:
        out["leakage"] = metrics.leakage_B(partner_logits_BxK, c_B, partner_classes_B, w_B)
    if null_logits_BxK is not None:
        out["null_confidence"] = (metrics.class_confidence(null_logits_BxK, c_B), w_B)
    for name, auc_B in (("deletion_auc", deletion_auc_B), ("insertion_auc", insertion_auc_B)):
        if auc_B is not None:
            out[name] = (auc_B, w_B)
    return out


class MetricAccumulator:
    """Collects per-instance values over batches (host numpy) and reduces them exactly.

    Pairwise metrics (``acIOU``, ``inter_class_iou``) use the first `max_pair_rows` valid
    pathways seen. On many hosts, gather the per-instance arrays first (each host sees its shard).
    """

    def __init__(self, num_classes: int | None = None, max_pair_rows: int = metrics.MAX_PAIR_ROWS):
        self.num_classes, self.max_pair_rows = num_classes, max_pair_rows
        self._values: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pathways: list[np.ndarray] = []
        self._classes: list[np.ndarray] = []

    def add(self, per_instance: PerInstance, gates_flat_BxN=None, classes_B=None, valid_B=None):
        """Adds one batch: `instance_metrics` output and, for IoU metrics, flat pathways."""
        for name, (v_B, w_B) in jax.device_get(dict(per_instance)).items():
            self._values.setdefault(name, []).append((np.asarray(v_B), np.asarray(w_B)))
        room = self.max_pair_rows - sum(len(c) for c in self._classes)
        if gates_flat_BxN is not None and room > 0:
            keep_B = np.ones(len(classes_B), bool) if valid_B is None else np.asarray(valid_B) > 0
            self._pathways.append(np.asarray(gates_flat_BxN)[keep_B][:room])
            self._classes.append(np.asarray(classes_B)[keep_B][:room])

    def result(self) -> dict[str, float]:
        """Flat dict of floats: weighted means per key, ``density_mean/std``, IoU metrics."""
        per = {
            name: tuple(np.concatenate([p[i] for p in parts]) for i in (0, 1))
            for name, parts in self._values.items()
        }
        flat = np.concatenate(self._pathways) if self._pathways else None
        classes = np.concatenate(self._classes) if self._classes else None
        return reduce(per, flat, classes, self.num_classes, self.max_pair_rows)


def reduce(
    per_instance: Mapping[str, tuple[np.ndarray, np.ndarray]],
    gates_flat_BxN: np.ndarray | None = None,
    classes_B: np.ndarray | None = None,
    num_classes: int | None = None,
    max_pair_rows: int = metrics.MAX_PAIR_ROWS,
) -> dict[str, float]:
    """Weighted means ``sum(v w) / sum(w)`` of per-instance values (host, float64).

    ``density`` becomes ``density_mean`` and ``density_std = sqrt(sum(w (d - mean)^2) / sum(w))``;
    with `gates_flat_BxN` (valid rows only) and `num_classes`, also ``acIOU`` and
    ``inter_class_iou`` (`metrics`, first `max_pair_rows` rows). NaN where no weight is positive.
    """
    out = {}
    for name, (v_B, w_B) in per_instance.items():
        v_B, w_B = np.asarray(v_B, np.float64), np.asarray(w_B, np.float64)
        total = w_B.sum()
        mean = float(np.where(w_B > 0, v_B * w_B, 0.0).sum() / total) if total > 0 else np.nan
        if name == "density":
            var = np.where(w_B > 0, (v_B - mean) ** 2 * w_B, 0.0).sum() / max(total, 1e-300)
            out["density_mean"], out["density_std"] = mean, float(np.sqrt(var))
        else:
            out[name] = mean
    if gates_flat_BxN is not None and num_classes is not None and len(gates_flat_BxN):
        flat_BxN = jnp.asarray(gates_flat_BxN[:max_pair_rows])
        c_B = jnp.asarray(classes_B[:max_pair_rows])
        out["acIOU"] = float(metrics.acIOU(flat_BxN, c_B, num_classes))
        out["inter_class_iou"] = float(metrics.inter_class_iou(flat_BxN, c_B))
    return out


def summarize(
    full_logits_BxK,
    outputs: Outputs,
    gates=None,
    classes_B=None,
    valid_B=None,
    *,
    num_classes: int | None = None,
) -> dict[str, float]:
    """One batch's metrics as a flat dict of floats (keys as in `instance_metrics`, plus
    ``density_mean, density_std``, and ``acIOU, inter_class_iou`` when `num_classes` is given).
    """
    acc = MetricAccumulator(num_classes)
    c_B = metrics.explained_classes(full_logits_BxK, classes_B)
    per = instance_metrics(full_logits_BxK, outputs, gates, c_B, valid_B)
    flat = None if gates is None else gates_lib.flatten(gates)
    acc.add(per, flat, c_B, valid_B)
    return acc.result()
