"""Random eviction: keep a uniformly random subset of the cache (a floor for every scored policy)."""

from __future__ import annotations

import torch

from .base import CacheLayout, LayerKV, Scale
from .policy import ScoredPolicy
from .registry import register


@register
class RandomKeep(ScoredPolicy):
    """Scores drawn from a generator seeded with ``seed`` at every reset, so a generation is reproducible and two
    generations with the same cache object make the same choices."""

    name = "random"

    def __init__(self, budget: float | None = None, seed: int = 0) -> None:
        super().__init__(budget)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r}: expected an integer")
        self.seed = seed
        self._gen = torch.Generator()

    def on_reset(self, layout: CacheLayout) -> None:
        super().on_reset(layout)
        self._gen.manual_seed(self.seed)

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        rows, heads, length, _ = store.k.shape
        return torch.rand(rows, heads, length, generator=self._gen).to(store.k.device)
