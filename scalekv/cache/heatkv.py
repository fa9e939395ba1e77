"""HeatKV (PEERS §5): whole source-scale blocks removed per (layer, head), by a static schedule from calibration."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import CacheLayout, Scale
from .head_stats import HeadStats
from .plan import Plan, average_capacity, plan_from_heads
from .policy import HeadAwarePolicy, positive_int
from .registry import register


def nested_ranks(n: int) -> torch.Tensor:
    """A rank for each of ``n`` positions such that the positions of rank below ``m`` are spread evenly over the
    block for every ``m`` (van der Corput order): ``(n,)`` int64, a permutation of ``0..n-1``."""
    bits = max(1, (n - 1).bit_length())
    keys = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]
    order = sorted(range(n), key=lambda i: keys[i])
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(n)
    return ranks


@register
class HeatKV(HeadAwarePolicy):
    """HeatKV at equal memory, on a per-head store.

    Every (layer, head) keeps the first ``protected`` scales; for every later source scale, the (layer, head) pairs
    are ranked by S-CAS (the attention later scales give that scale's keys, ``calibration``), least needed first,
    or in a random order (``seed``, an uncalibrated baseline). After every compressed scale, blocks are removed in
    rank order (rank 0 of every source scale, larger scales first, then rank 1, ...) until the mean over layers and
    heads is exactly ``B``; the last block touched may lose only part of its tokens (an evenly spread subset, nested
    so that what a head drops later is a subset of what it held). The schedule is static: fixed at reset from the
    budget, the schedule of scales and the ranking; nothing is scored at run time. Where the protected scales alone
    exceed ``B``, they are cut too, newest first, every head keeping at least its first token."""

    name = "heatkv"
    title = "HeatKV"

    def __init__(
        self,
        budget: float | None = None,
        calibration: HeadStats | str | Path | None = None,
        seed: int | None = None,
        *,
        protected: int = 3,
    ) -> None:
        super().__init__(budget, calibration, seed, "seed=<int>", note="random removal orders; ")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed={seed!r}: expected a non-negative integer")
        self.seed = seed
        self.protected = positive_int("protected", protected)
        self._kept: list[torch.Tensor] = []  # per scale: (layers, heads, scales) tokens kept of each source
        self._ranks: torch.Tensor | None = None
        self._devices: dict = {}

    def orders(self, layout: CacheLayout) -> torch.Tensor:
        """``(scales, layers * heads)``: for every source scale, the flat (layer, head) indices, removed first
        first."""
        pairs, count = layout.num_layers * layout.num_heads, len(layout.scales)
        if self.stats is None:
            g = torch.Generator().manual_seed(self.seed)
            return torch.stack([torch.randperm(pairs, generator=g) for _ in range(count)])
        self.stats.check_layout(layout, schedule=True)
        scas = torch.tensor(self.stats.scas).reshape(pairs, count)
        return torch.stack([torch.argsort(scas[:, s], stable=True) for s in range(count)])

    def make_plan(self, layout: CacheLayout) -> Plan:
        layers, heads, scales = layout.num_layers, layout.num_heads, layout.scales
        avg = average_capacity(self.budget, scales)
        order = self.orders(layout).tolist()
        target = layers * heads * avg
        kept = torch.zeros(layers * heads, len(scales), dtype=torch.long)
        rows, self._kept, started = [], [], False
        for scale in scales:
            kept[:, scale.index] = scale.length
            if not scale.is_last and (started or int(kept.sum()) > target):
                started = True
                need = int(kept.sum()) - target
                sources = list(range(scale.index, min(self.protected, scale.index + 1) - 1, -1))
                need = self._remove(kept, order, sources, need, floor=0)
                for s in range(min(self.protected, scale.index + 1) - 1, -1, -1):  # protected scales, newest first
                    if need <= 0:
                        break
                    need = self._remove(kept, [list(range(layers * heads))] * len(scales), [s], need, floor=int(s == 0))
            self._kept.append(kept.reshape(layers, heads, -1).clone())
            rows.append(kept.sum(1).reshape(layers, heads).tolist())
        provenance = {
            "rule": "heatkv",
            "protected": self.protected,
            "order": "random" if self.stats is None else "scas",
        }
        return plan_from_heads(scales, rows, self.budget, provenance=provenance)

    @staticmethod
    def _remove(kept: torch.Tensor, order, sources: list[int], need: int, floor: int) -> int:
        """Take up to ``need`` tokens from ``sources`` blocks, rank by rank, each block keeping ``floor``."""
        for rank in range(kept.shape[0]):
            for s in sources:
                if need <= 0:
                    return 0
                pair = order[s][rank]
                take = min(int(kept[pair, s]) - floor, need)
                if take > 0:
                    kept[pair, s] -= take
                    need -= take
        return need

    def on_reset(self, layout: CacheLayout) -> None:
        super().on_reset(layout)
        self._ranks = torch.cat([nested_ranks(s.length) for s in layout.scales])
        self._devices = {}

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store, capacity) -> list[torch.Tensor]:
        dev = q.device
        if dev not in self._devices:
            self._devices[dev] = (self._ranks.to(dev), [k.to(dev) for k in self._kept])
        ranks, kept_all = self._devices[dev]
        kept = []
        for h, cap in enumerate(capacity):
            pos = store.positions[h]
            allowed = kept_all[scale.index][layer, h][store.source_scales(h)]
            keep = ranks[pos] < allowed
            idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :cap]
            kept.append(idx.sort(dim=-1).values)
        return kept
