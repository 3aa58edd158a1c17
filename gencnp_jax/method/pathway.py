"""The Pathway: binary gates of a batch of explained inputs, with their scores and logits.

A `flax.struct` pytree (crosses jit unchanged); saved as a dependency-free ``.npz`` file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gencnp_jax.models import gates as gates_lib

_ARRAY_FIELDS = ("explained_class", "full_logits", "pathway_logits")
SITE_FIELDS = ("gates", "scores", "ranking")  # site -> f32[B, C] each


@flax.struct.dataclass
class Pathway:
    """Pathways of a batch of ``B`` inputs.

    Attributes:
      gates: ``site -> f32[B, C]``, exactly 0/1: the kept neurons.
      scores: ``site -> f32[B, C]``: the scores the gates were rounded from.
      ranking: ``site -> f32[B, C]``: logits that order the neurons, most important first,
        for a pathway at a fixed density (the generator's rank head; without one, the
        scores' logits).
      explained_class: ``i32[B]``: the class each pathway explains (``H``'s prediction).
      full_logits: ``f32[B, K]``: logits of the full model.
      pathway_logits: ``f32[B, K]``: logits of the model restricted to the pathway.

    Note: jax sorts dict keys when it flattens a pytree, so after a jit round trip the site
    order of `gates` / `scores` / `ranking` is alphabetical; every method here is
    order-independent.
    """

    gates: dict[str, jax.Array]
    scores: dict[str, jax.Array]
    ranking: dict[str, jax.Array]
    explained_class: jax.Array
    full_logits: jax.Array
    pathway_logits: jax.Array

    @classmethod
    def create(
        cls,
        gates: Mapping[str, jax.Array],
        scores: Mapping[str, jax.Array],
        full_logits_BxK: jax.Array,
        pathway_logits_BxK: jax.Array,
        explained_class_B: jax.Array | None = None,
        ranking: Mapping[str, jax.Array] | None = None,
    ) -> Pathway:
        """Builds a Pathway; the explained class defaults to ``argmax(full_logits)``, the
        ranking to the scores' logits."""
        if explained_class_B is None:
            explained_class_B = jnp.argmax(full_logits_BxK, axis=-1)
        if ranking is None:
            ranking = {
                s: jax.scipy.special.logit(jnp.clip(v, 1e-7, 1 - 1e-7)) for s, v in scores.items()
            }
        return cls(
            gates=dict(gates),
            scores=dict(scores),
            ranking=dict(ranking),
            explained_class=jnp.asarray(explained_class_B, jnp.int32),
            full_logits=full_logits_BxK,
            pathway_logits=pathway_logits_BxK,
        )

    @property
    def batch_size(self) -> int:
        return int(self.explained_class.shape[0])

    def density(self) -> jax.Array:
        """Kept neurons / all neurons per instance, over all sites: ``f32[B]``."""
        return gates_lib.density(self.gates)

    def site_density(self) -> dict[str, jax.Array]:
        """Kept fraction per instance at each site: ``site -> f32[B]``."""
        return gates_lib.site_density(self.gates)

    def iou(self, other: Pathway) -> jax.Array:
        """IoU of the flattened binary gates, per instance: ``f32[B]``.

        ``IoU = |P & Q| / |P | Q|``, summed over all sites; two empty pathways have IoU 1.
        """
        gates_lib.check_sites(other.gates, {s: g.shape[-1] for s, g in self.gates.items()})
        rows = jax.vmap(lambda p, q: gates_lib.iou_matrix(p[None], q[None])[0, 0])
        return rows(gates_lib.flatten(self.gates), gates_lib.flatten(other.gates))

    def take(self, indices) -> Pathway:
        """The pathways at `indices` (an int array, slice or boolean mask; keeps the batch axis)."""
        return jax.tree.map(lambda x: x[indices], self)

    def to_numpy(self) -> dict:
        """Nested dict of numpy arrays with the same field names."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return jax.tree.map(np.asarray, fields)

    def flat_arrays(self) -> dict[str, np.ndarray]:
        """What `save` writes: ``gates/<site>``, ``scores/<site>``, ``ranking/<site>``, the
        array fields and ``sites`` (their order)."""
        arrays = self.to_numpy()
        flat = {name: arrays[name] for name in _ARRAY_FIELDS}
        for field in SITE_FIELDS:
            flat.update({f"{field}/{site}": v for site, v in arrays[field].items()})
        flat["sites"] = np.asarray(list(self.gates), dtype=str)
        return flat

    def save(self, path: str | os.PathLike) -> None:
        """Writes an ``.npz`` file of `flat_arrays` (`load` reads it back)."""
        flat = self.flat_arrays()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"  # renamed into place once whole
        try:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **flat)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pathway:
        """Reads a file written by `save`; sites come back in the order they were saved (a
        file saved before pathways had a ranking gets the scores' logits)."""
        with np.load(path) as data:
            sites = [str(s) for s in data["sites"]]
            fields = {
                field: {s: jnp.asarray(data[f"{field}/{s}"]) for s in sites}
                for field in SITE_FIELDS
                if f"{field}/{sites[0]}" in data
            }
            arrays = {name: jnp.asarray(data[name]) for name in _ARRAY_FIELDS}
        return cls.create(
            fields["gates"],
            fields["scores"],
            arrays["full_logits"],
            arrays["pathway_logits"],
            arrays["explained_class"],
            fields.get("ranking"),
        )
