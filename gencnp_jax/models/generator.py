"""The GEN-CNP generator: clean classifier features -> per-site importance scores.

RFE (shallow -> deep embeddings), PDN (class code z and auxiliary class head q), RPD (deep ->
shallow decoders emitting scores); DAQ turns the scores into binary gates (docs/METHOD.md §3).
Optionally (ours) the generator also reads each channel's first-order effect (``fo``, one
backward pass: `method.evidence`), and a separate rank head orders the channels for fixed
densities while the gate head decides the pathway at the generator's own density.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

CELLS = ("gru", "lstm", "mlp")
Fo = Mapping[str, jax.Array] | None  # site -> f32[B, C] first-order effects, or none
POOLINGS = ("avg", "max")


class PoolStats(nnx.Variable):
    """Training-set mean and std of a site's pooled features: fixed, never trained."""


class Cell(nnx.Module):
    """A recurrent cell with one interface for all kinds: ``(carry, u) -> (carry, h)``.

    ``"gru"`` is `nnx.GRUCell`, ``"lstm"`` is `nnx.LSTMCell` (carry ``(c, h)``), ``"mlp"`` is
    ``h' = tanh(Dense([h, u]))``. `from_hidden` builds a carry from a hidden vector.
    """

    def __init__(self, kind: str, features: int, *, rngs: nnx.Rngs):
        if kind not in CELLS:
            raise ValueError(f"unknown recurrent cell {kind!r}: choose one of {CELLS}")
        self.kind = kind
        if kind == "gru":
            self.core = nnx.GRUCell(features, features, rngs=rngs)
        elif kind == "lstm":
            self.core = nnx.LSTMCell(features, features, rngs=rngs)
        else:
            self.core = nnx.Linear(2 * features, features, rngs=rngs)

    def from_hidden(self, h_BxD: jax.Array):
        """The carry whose hidden state is `h_BxD` (LSTM memory starts at zero)."""
        return (jnp.zeros_like(h_BxD), h_BxD) if self.kind == "lstm" else h_BxD

    def __call__(self, carry, u_BxD: jax.Array):
        if self.kind == "mlp":
            h = jnp.tanh(self.core(jnp.concatenate([carry, u_BxD], axis=-1)))
            return h, h
        return self.core(carry, u_BxD)


def pool(feats_Bx___xC: jax.Array, pooling: Sequence[str]) -> jax.Array:
    """Global pools over every axis between batch and channels (positions ``H, W``, tokens
    ``N``, none for ``(B, C)``), concatenated: ``f32[B, len(pooling) * C]``."""
    axes = tuple(range(1, feats_Bx___xC.ndim - 1))
    pooled = []
    for name in pooling:
        if name == "avg":
            pooled.append(jnp.mean(feats_Bx___xC, axis=axes))
        elif name == "max":
            pooled.append(jnp.max(feats_Bx___xC, axis=axes))
        else:
            raise ValueError(f"unknown pooling {name!r}: choose from {POOLINGS}")
    return jnp.concatenate(pooled, axis=-1)


class Generator(nnx.Module):
    """GEN-CNP generator (docs/METHOD.md §3): ``(features, fo) -> (scores, q_logits)``.

    Per-site submodules live in `nnx.List`s indexed in the order of `site_channels`
    (shallow to deep), so site names with ``"/"`` never become attribute names.
    """

    def __init__(
        self,
        site_channels: Mapping[str, int],
        num_classes: int,
        *,
        hidden: int,
        cell: str,
        pooling: Sequence[str],
        init_open: float,
        grad_evidence: bool,
        rank_head: bool,
        rngs: nnx.Rngs,
    ):
        """Hyper-parameters are required keywords: the config holds their defaults.

        Args:
          site_channels: ``site -> channels``, shallow to deep.
          num_classes: the PDN head's outputs.
          hidden: ``D``, the size of every embedding and state.
          cell: the recurrent cell of RFE and RPD, one of `CELLS`.
          pooling: the global pools of each site's feature map, from `POOLINGS`.
          init_open: the initial score of every gate, in (0, 1).
          grad_evidence: read each channel's first-order effect ``fo`` (`method.evidence`)
            beside its pools: in the embedders' inputs and in its gate logit.
          rank_head: a second per-site head whose logits rank the channels at fixed densities
            (`ranking`); without it the gate logits rank them.
        """
        if not 0.0 < init_open < 1.0:
            raise ValueError(f"init_open must lie in (0, 1), got {init_open}")
        for name in pooling:
            if name not in POOLINGS:
                raise ValueError(f"unknown pooling {name!r}: choose from {POOLINGS}")
        self.sites = tuple(site_channels)
        self.site_channels = dict(site_channels)
        self.pooling = tuple(pooling)
        self.hidden = hidden
        self.grad_evidence = grad_evidence
        self.rank_head = rank_head
        d, npool = hidden, len(self.pooling)
        nin = npool + int(grad_evidence)  # per-channel inputs of the embedders
        # RFE: u_l = Dense(LayerNorm([GAP, GMP(, fo)])), e_l = Cell(e_{l-1}, u_l); the LayerNorm
        # because pooled features of different sites live on very different scales.
        channels = list(site_channels.values())
        self.rfe_in = nnx.List([nnx.Linear(nin * c, d, rngs=rngs) for c in channels])
        self.rfe_norm = nnx.List([nnx.LayerNorm(nin * c, rngs=rngs) for c in channels])
        self.rfe_cells = nnx.List([Cell(cell, d, rngs=rngs) for _ in self.sites])
        # PDN: z = MLP([e_L, mean_l e_l]); q = W z.
        self.pdn_1 = nnx.Linear(2 * d, d, rngs=rngs)
        self.pdn_2 = nnx.Linear(d, d, rngs=rngs)
        self.q_head = nnx.Linear(d, num_classes, rngs=rngs)
        # RPD: h_{L+1} = tanh(Dense(z)), h_l = Cell(h_{l+1}, Dense([z, e_l])), s_l = sigmoid(.).
        self.rpd_init = nnx.Linear(d, d, rngs=rngs)
        self.rpd_in = nnx.List([nnx.Linear(2 * d, d, rngs=rngs) for _ in self.sites])
        self.rpd_cells = nnx.List([Cell(cell, d, rngs=rngs) for _ in self.sites])
        # Bias logit(init_open): gates start mostly open, not collapsed.
        kernel = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        bias = nnx.initializers.constant(math.log(init_open / (1.0 - init_open)))
        self.score_heads = nnx.List(
            [nnx.Linear(d, c, kernel_init=kernel, bias_init=bias, rngs=rngs) for c in channels]
        )
        # Channel evidence (ours): each gate logit also sees its own channel's standardised
        # pooled activations, alpha_k z(GAP_k) + beta_k z(GMP_k). Without this direct path a
        # per-channel bias can express one constant mask for every input.
        self.evidence = nnx.List(
            [nnx.Param(jnp.full((npool, c), 0.5, jnp.float32)) for c in channels]
        )
        self.pool_mean = nnx.List([PoolStats(jnp.zeros((npool * c,))) for c in channels])
        self.pool_std = nnx.List([PoolStats(jnp.ones((npool * c,))) for c in channels])
        if grad_evidence:  # + gamma_k fo_k in each gate logit
            self.fo_weight = nnx.List(
                [nnx.Param(jnp.full((c,), 0.5, jnp.float32)) for c in channels]
            )
        if rank_head:  # rank_l = Dense(h_l) + sum_p alpha'_{p,k} z_p(k) (+ gamma'_k fo_k)
            self.rank_heads = nnx.List(
                [nnx.Linear(d, c, kernel_init=kernel, rngs=rngs) for c in channels]
            )
            self.rank_evidence = nnx.List(
                [nnx.Param(jnp.full((npool, c), 0.5, jnp.float32)) for c in channels]
            )
            if grad_evidence:
                self.rank_fo_weight = nnx.List(
                    [nnx.Param(jnp.full((c,), 1.0, jnp.float32)) for c in channels]
                )

    def set_pool_stats(self, stats: Mapping[str, tuple[jax.Array, jax.Array]]) -> None:
        """Stores the training-set ``(mean, std)`` of each site's pooled features,
        ``f32[len(pooling) * C]`` each, used to standardise the channel evidence (sites left out
        keep theirs)."""
        for i, site in enumerate(self.sites):
            if site not in stats:
                continue
            mean, std = stats[site]
            self.pool_mean[i].value = jnp.asarray(mean, jnp.float32)
            self.pool_std[i].value = jnp.maximum(jnp.asarray(std, jnp.float32), 1e-6)

    def pools(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """What the generator reads of the clean feature maps ``site -> f32[B, ..., C]``: each
        site's global pools, ``site -> f32[B, len(pooling) * C]`` (`pool`). The classifier is
        frozen: no gradient flows into its features."""
        missing = [s for s in self.sites if s not in features]
        if missing:
            raise KeyError(f"features lack gate sites {missing}; generator sites: {self.sites}")
        return {
            site: pool(jax.lax.stop_gradient(features[site]).astype(jnp.float32), self.pooling)
            for site in self.sites
        }

    def embed(self, pools: Mapping[str, jax.Array], fo: Fo = None) -> list[jax.Array]:
        """RFE, shallow to deep, from each site's `pools`: ``[e_1, ..., e_L]``, ``f32[B, D]``."""
        if self.grad_evidence and fo is None:
            raise ValueError(
                "this generator reads first-order effects: pass fo (method.evidence.read)"
            )
        batch = pools[self.sites[0]].shape[0]
        carry = self.rfe_cells[0].from_hidden(jnp.zeros((batch, self.hidden), jnp.float32))
        embeddings = []
        for i, site in enumerate(self.sites):
            inputs_BxP = pools[site]
            if self.grad_evidence:
                inputs_BxP = jnp.concatenate([inputs_BxP, jax.lax.stop_gradient(fo[site])], -1)
            carry, e_BxD = self.rfe_cells[i](carry, self.rfe_in[i](self.rfe_norm[i](inputs_BxP)))
            embeddings.append(e_BxD)
        return embeddings

    def _evidence(self, i: int, pooled_BxP: jax.Array, alpha_PxC: jax.Array) -> jax.Array:
        """``sum_p alpha_{p,k} z_p(k)`` per channel: ``f32[B, C]``."""
        z_BxP = (pooled_BxP - self.pool_mean[i].value) / self.pool_std[i].value
        z_BxNxC = z_BxP.reshape(z_BxP.shape[0], len(self.pooling), -1)
        return jnp.sum(z_BxNxC * alpha_PxC[None], axis=1)

    def __call__(self, features: Mapping[str, jax.Array], fo: Fo = None):
        """Scores ``site -> f32[B, C_site]`` in ``[0, 1]`` and PDN logits ``f32[B, K]``."""
        logits, q_logits_BxK = self.logits(features, fo)
        return {site: jax.nn.sigmoid(v) for site, v in logits.items()}, q_logits_BxK

    def logits(self, features: Mapping[str, jax.Array], fo: Fo = None):
        """The scores before their sigmoid, ``site -> f32[B, C_site]``, and the PDN logits
        ``f32[B, K]``."""
        out = self.outputs(features, fo)
        return out["gate"], out["q"]

    def ranking(self, features: Mapping[str, jax.Array], fo: Fo = None) -> dict[str, jax.Array]:
        """``site -> f32[B, C_site]``: what orders the channels at a fixed density, the rank
        head's logits, else the gate logits (never their sigmoids: those saturate and tie)."""
        return self.scores_and_ranking(features, fo)[1]

    def scores_and_ranking(self, features: Mapping[str, jax.Array], fo: Fo = None):
        """One pass: the scores ``site -> f32[B, C]`` in [0, 1] and the `ranking` logits."""
        out = self.outputs(features, fo)
        scores = {site: jax.nn.sigmoid(v) for site, v in out["gate"].items()}
        return scores, out["gate"] if out["rank"] is None else out["rank"]

    def outputs(self, features: Mapping[str, jax.Array], fo: Fo = None) -> dict:
        """One pass: ``{"gate": site -> f32[B, C] logits, "rank": the rank head's logits (None
        without one), "q": PDN logits f32[B, K]}``.

        Args:
          features: ``site -> f32[B, ..., C]``, the classifier's clean feature maps.
          fo: ``site -> f32[B, C]``, the first-order effects (`method.evidence.read`); required
            when the generator reads them, ignored otherwise.
        """
        return self.outputs_from_pools(self.pools(features), fo)

    def outputs_from_pools(self, pools: Mapping[str, jax.Array], fo: Fo = None) -> dict:
        """`outputs` from the feature maps' `pools` (what a training step can read once and
        reuse for images it sees again)."""
        embeddings = self.embed(pools, fo)
        e_mean = jnp.mean(jnp.stack(embeddings), axis=0)
        z_BxD = self.pdn_2(nnx.gelu(self.pdn_1(jnp.concatenate([embeddings[-1], e_mean], -1))))
        q_logits_BxK = self.q_head(z_BxD)
        carry = self.rpd_cells[-1].from_hidden(jnp.tanh(self.rpd_init(z_BxD)))
        gate, rank = {}, {}
        for i in reversed(range(len(self.sites))):
            site = self.sites[i]
            u_BxD = self.rpd_in[i](jnp.concatenate([z_BxD, embeddings[i]], axis=-1))
            carry, h_BxD = self.rpd_cells[i](carry, u_BxD)
            gate_BxC = self.score_heads[i](h_BxD) + self._evidence(
                i, pools[site], self.evidence[i].value
            )
            fo_BxC = jax.lax.stop_gradient(fo[site]) if self.grad_evidence else None
            if self.grad_evidence:
                gate_BxC = gate_BxC + self.fo_weight[i].value * fo_BxC
            gate[site] = gate_BxC
            if self.rank_head:
                rank_BxC = self.rank_heads[i](h_BxD) + self._evidence(
                    i, pools[site], self.rank_evidence[i].value
                )
                if self.grad_evidence:
                    rank_BxC = rank_BxC + self.rank_fo_weight[i].value * fo_BxC
                rank[site] = rank_BxC
        return {
            "gate": {site: gate[site] for site in self.sites},
            "rank": {site: rank[site] for site in self.sites} if self.rank_head else None,
            "q": q_logits_BxK,
        }
