"""Models as they cross jit: the graph definition static, the weights (and fills) as leaves.

`FrozenClassifier` is the classifier under explanation with the values its closed gates take
(its ablation fills): ``classifier.classify(images, gates=None) -> (logits, features)`` is the
one gated forward of every method, metric and loss. `FrozenGenerator` is a trained (or
training) GEN-CNP generator. Both are pytrees, so they are arguments of jitted functions
(never closed-over constants, which XLA would bake in), are replicated over a mesh with
`jax.tree.map`, and carry their graph definition as static data compared by identity: NNX
graph definitions may hold unhashable attributes, and one run builds each model once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gencnp_jax.models import classifiers, daq
from gencnp_jax.models import gates as gates_lib


class _Static:
    """Static pytree data hashed and compared by identity (an NNX GraphDef may not hash)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Static) and other.value is self.value


@jax.tree_util.register_pytree_node_class
class FrozenClassifier:
    """A classifier that is explained, never trained: ``(graphdef, state)`` and its fills.

    Attributes:
      graphdef: a built-in model's NNX GraphDef or a user's model gated by `attach`
        (`classifiers.forward` runs either).
      state: its weights and BatchNorm statistics (leaves).
      fills: ``site -> f32[C]``, what a closed gate leaves (mean ablation), or None (zero).
      site_channels: ``site -> channels``, shallow to deep.
      num_classes: its number of outputs.
    """

    def __init__(
        self,
        graphdef: classifiers.Definition,
        state,
        site_channels: Mapping[str, int],
        num_classes: int,
        fills: gates_lib.Fills | None = None,
    ):
        self.graphdef, self.state, self.fills = graphdef, state, fills
        self.site_channels, self.num_classes = dict(site_channels), int(num_classes)

    def classify(self, images, gates: gates_lib.Gates | None = None):
        """``(logits f32[B, K], features)``; `gates` None runs the full model (pure, jit-able)."""
        return classifiers.forward(self.graphdef, self.state, images, gates, self.fills)

    def logits(self, images, gates: gates_lib.Gates | None = None) -> jax.Array:
        return self.classify(images, gates)[0]

    def logits_of_passes(self, passes: Sequence[tuple[jax.Array, gates_lib.Gates]]) -> list:
        """The logits ``f32[B, K]`` of several gated passes ``[(images f32[B, ...], gates)]``,
        in order, from one forward over all of them.

        The passes' rows are interleaved (row ``b * P + p`` is pass p's row b), not
        concatenated: on a batch-sharded mesh each device then keeps its own rows, where a
        concatenation would move half of every pass to the other devices and back.
        """
        count = len(passes)
        interleave = lambda *parts: jnp.stack(parts, 1).reshape(-1, *parts[0].shape[1:])
        images = interleave(*[x for x, _ in passes])
        gates = jax.tree.map(interleave, *[g for _, g in passes])
        logits_BPxK = self.logits(images, gates)
        logits_BxPxK = logits_BPxK.reshape(-1, count, logits_BPxK.shape[-1])
        return [logits_BxPxK[:, p] for p in range(count)]

    def with_fills(self, fills: gates_lib.Fills | None) -> FrozenClassifier:
        """The same classifier under other fills (another ablation)."""
        return FrozenClassifier(
            self.graphdef, self.state, self.site_channels, self.num_classes, fills
        )

    def with_state(self, state) -> FrozenClassifier:
        """The same architecture with other weights (e.g. randomised, for the sanity check)."""
        return FrozenClassifier(
            self.graphdef, state, self.site_channels, self.num_classes, self.fills
        )

    @property
    def num_neurons(self) -> int:
        return sum(self.site_channels.values())

    def tree_flatten(self):
        static = (_Static(self.graphdef), tuple(self.site_channels.items()), self.num_classes)
        return (self.state, self.fills), static

    @classmethod
    def tree_unflatten(cls, static, children):
        graphdef, sites, num_classes = static
        return cls(graphdef.value, children[0], dict(sites), num_classes, children[1])


@jax.tree_util.register_pytree_node_class
class FrozenGenerator:
    """A GEN-CNP generator as it crosses jit: ``(graphdef, state)``.

    ``generator.pathway(features, daq, fo)`` is one generator pass: scores, exact 0/1 gates
    (DAQ) and the PDN logits. `fo` (first-order effects, `method.evidence.read`) is needed when
    `reads_gradients`.
    """

    def __init__(self, graphdef: nnx.GraphDef, state):
        self.graphdef, self.state = graphdef, state

    def _module(self):
        return nnx.merge(self.graphdef, self.state)

    @property
    def reads_gradients(self) -> bool:
        """Whether the generator reads first-order effects (a static property of its graph)."""
        return bool(self._module().grad_evidence)

    def __call__(self, features, fo=None):
        """``(scores site -> f32[B, C] in [0, 1], q_logits f32[B, K])``."""
        return self._module()(features, fo)

    def pathway(self, features, settings: daq.Settings, fo=None):
        """``(scores, gates, q_logits)``: the scores, binarized by DAQ (`daq.Settings`)."""
        scores, q_logits_BxK = self(features, fo)
        return scores, settings.binarize(scores), q_logits_BxK

    def pathway_and_ranking(self, features, settings: daq.Settings, fo=None):
        """``(scores, gates, ranking)`` from one generator pass (`Generator.ranking`)."""
        scores, ranking = self._module().scores_and_ranking(features, fo)
        return scores, settings.binarize(scores), ranking

    def logits(self, features, fo=None):
        """``site -> f32[B, C]``: the gate scores before their sigmoid."""
        return self._module().logits(features, fo)[0]

    def ranking(self, features, fo=None):
        """``site -> f32[B, C]``: what orders the channels at fixed densities (the rank head's
        logits, else the gate logits; `Generator.ranking`)."""
        return self._module().ranking(features, fo)

    def tree_flatten(self):
        return (self.state,), (_Static(self.graphdef),)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(static[0].value, children[0])
