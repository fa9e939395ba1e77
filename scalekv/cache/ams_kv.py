"""AMS-KV (PEERS §3): the coarsest scales locked, the most recent kept, the middle evicted oldest first; layers
whose keys change most between adjacent scales keep more."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import CacheLayout, Scale
from .head_stats import HeadStats, check_fraction, check_pairs
from .plan import Plan, build_plan
from .policy import HeadAwarePolicy, positive_int
from .registry import register

# Chosen by measurement on the demo model (docs/head_aware.md); PEERS §3.2 gives no values (hand-set per model).
DEFAULT_DEMANDING_SHARE = 0.25
DEFAULT_RATIO = 2.0


@register
class AMSKV(HeadAwarePolicy):
    """AMS-KV at equal memory.

    Cache-demanding layers (the ``demanding_share`` of layers with the lowest inter-scale key ``similarity`` of a
    calibration, or ``demanding`` given as layer indices) target ``ratio`` times the capacity of the others, the
    layer mean staying ``B``. Every layer keeps the tokens of its ``condensed`` coarsest scales (oldest first if
    they do not fit), then the most recent tokens: whole recent scales and, at the capacity boundary, the newest
    part of the next older one. Kept tokens carry their source scale (per-head store), so the condensed scales are
    known after any number of cuts."""

    name = "ams_kv"
    title = "AMS-KV"

    def __init__(
        self,
        budget: float | None = None,
        calibration: HeadStats | str | Path | None = None,
        demanding: list | None = None,
        *,
        demanding_share: float = DEFAULT_DEMANDING_SHARE,
        ratio: float = DEFAULT_RATIO,
        condensed: int = 2,
    ) -> None:
        super().__init__(budget, calibration, demanding, "demanding=[layer, ...]")
        self.demanding = [p[0] for p in check_pairs("demanding", demanding, 1)] if demanding is not None else None
        self.demanding_share = check_fraction("demanding_share", demanding_share, low_open=False)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
            raise ValueError(f"ratio={ratio!r}: expected C_max / C_min >= 1")
        self.ratio = float(ratio)
        self.condensed = positive_int("condensed", condensed)

    def demanding_layers(self, layout: CacheLayout) -> list[int]:
        if self.demanding is not None:
            bad = [d for d in self.demanding if d >= layout.num_layers]
            if bad:
                raise ValueError(f"demanding layers {bad}: the model has {layout.num_layers} layers")
            return sorted(set(self.demanding))
        self.stats.check_layout(layout)
        sim = torch.tensor(self.stats.similarity)
        count = round(self.demanding_share * layout.num_layers)
        return sorted(torch.argsort(sim, stable=True)[:count].tolist())

    def make_plan(self, layout: CacheLayout) -> Plan:
        demanding = set(self.demanding_layers(layout))
        weights = [self.ratio if layer in demanding else 1.0 for layer in range(layout.num_layers)]
        provenance = {"rule": "ams_kv", "demanding": sorted(demanding), "ratio": self.ratio}
        return build_plan(
            layout.scales, layout.num_layers, self.budget, lambda k, j, avg: weights, provenance=provenance
        )

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store, capacity: int) -> torch.Tensor:
        kept = []
        for h in range(len(store.heads)):
            pos = store.positions[h].to(torch.float32)
            locked = store.source_scales(h) < self.condensed
            order = torch.where(locked, 2 * self.layout.total_tokens - pos, pos)  # condensed oldest first, then newest
            kept.append(order.topk(capacity, dim=-1, sorted=False).indices.sort(dim=-1).values)
        return torch.stack(kept, dim=1)
