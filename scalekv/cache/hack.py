"""HACK (PEERS §2): heads classified offline as contextual or structural, each group its own budget and rule."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import CacheLayout, Scale
from .head_stats import HeadStats, check_fraction, check_pairs
from .plan import Plan, head_plan
from .policy import HeadAwarePolicy, attention_mass, positive_int
from .registry import register

# Chosen by measurement on the demo model (docs/head_aware.md): the share of heads that are contextual and the
# contextual budget as a fraction of B (PEERS §2.2: both unconfirmed in the paper).
DEFAULT_ALPHA = 0.25
DEFAULT_CONTEXTUAL_SHARE = 0.25


def observation_queries(n: int, count: int) -> torch.Tensor:
    """``min(n, count)`` evenly spaced positions of an ``n``-token map, ``(m,)`` int64 ascending, first and last
    included."""
    if n <= count:
        return torch.arange(n)
    return torch.linspace(0, n - 1, count).round().long().unique()


@register
class HACK(HeadAwarePolicy):
    """HACK at equal memory, on a per-head store.

    Heads are contextual or structural: the ``alpha`` share of all heads with the lowest column variance ``sigma``
    of a calibration (``calibration``: :class:`~scalekv.cache.head_stats.HeadStats` or its file) are contextual, or
    ``contextual`` lists them as ``[[layer, head], ...]``. Contextual heads target ``contextual_share * B`` tokens,
    structural heads what keeps the mean over all heads at ``B`` (per-head capacities, capped at what a head holds).

    Every cached token is scored per (row, head) by the softmax attention of ``queries`` evenly spaced queries of
    the current map. Contextual heads keep their top scores; structural heads keep the first two scales, then the
    current scale, then the top scores of the scales in between (where the first two and the current scale do not
    fit, the first two come first and the current scale's best-scoring tokens fill the rest). HACK's soft merge of
    evicted tokens at the last compression is not done."""

    name = "hack"
    title = "HACK"

    def __init__(
        self,
        budget: float | None = None,
        calibration: HeadStats | str | Path | None = None,
        contextual: list | None = None,
        *,
        alpha: float = DEFAULT_ALPHA,
        contextual_share: float = DEFAULT_CONTEXTUAL_SHARE,
        queries: int = 32,
    ) -> None:
        super().__init__(budget, calibration, contextual, "contextual=[[layer, head], ...]")
        self.contextual = check_pairs("contextual", contextual, 2) if contextual is not None else None
        self.alpha = check_fraction("alpha", alpha, low_open=False)
        self.contextual_share = check_fraction("contextual_share", contextual_share, high_open=False)
        self.queries = positive_int("queries", queries)
        self.kinds: torch.Tensor | None = None  # (layers, heads) bool, True = contextual

    def classify(self, layout: CacheLayout) -> torch.Tensor:
        """``(layers, heads)`` bool: True where a head is contextual."""
        kinds = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
        if self.contextual is not None:
            for layer, head in self.contextual:
                if layer >= layout.num_layers or head >= layout.num_heads:
                    raise ValueError(
                        f"contextual head [{layer}, {head}]: the model has {layout.num_layers} layers x "
                        f"{layout.num_heads} heads"
                    )
                kinds[layer, head] = True
            return kinds
        self.stats.check_layout(layout)
        sigma = torch.tensor(self.stats.sigma).flatten()
        count = round(self.alpha * sigma.numel())
        kinds.view(-1)[torch.argsort(sigma, stable=True)[:count]] = True
        return kinds

    def make_plan(self, layout: CacheLayout) -> Plan:
        self.kinds = self.classify(layout)
        total = self.kinds.numel()
        n_ctx = int(self.kinds.sum())

        def targets(k: int, j: int, avg: int) -> list[list[float]]:
            if n_ctx in (0, total):
                return [[1.0] * layout.num_heads for _ in range(layout.num_layers)]
            ctx = self.contextual_share * avg
            struct = (total * avg - n_ctx * ctx) / (total - n_ctx)
            return [[ctx if c else struct for c in row] for row in self.kinds.tolist()]

        provenance = {"rule": "hack", "contextual_heads": n_ctx, "contextual_share": self.contextual_share}
        return head_plan(
            layout.scales, layout.num_layers, layout.num_heads, self.budget, targets, provenance=provenance
        )

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store, capacity) -> list[torch.Tensor]:
        obs = observation_queries(scale.length, self.queries).to(q.device)
        q_obs = q.index_select(2, obs)
        kept = []
        for h, cap in enumerate(capacity):
            head = store.heads[h]
            mass = attention_mass(q_obs[:, h : h + 1], head.k, self.layout.softmax_scale)[:, 0]
            if not self.kinds[layer, h]:  # structural: the first two scales, then the current scale, then scores
                src = store.source_scales(h)
                tier = (src < 2).to(mass.dtype) * 2 + (src == scale.index).to(mass.dtype)
                mass = mass + tier * (obs.numel() + 1)  # a mass never exceeds the number of queries
            kept.append(mass.topk(cap, dim=-1, sorted=False).indices.sort(dim=-1).values)
        return kept
