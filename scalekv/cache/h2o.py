"""H2O: heavy hitters (attention accumulated over every scale so far) plus the most recent tokens."""

from __future__ import annotations

import torch

from .base import CacheLayout, LayerKV, Scale
from .policy import ScoredPolicy, attention_mass
from .registry import register


@register
class H2O(ScoredPolicy):
    """Every cached token's score is the softmax attention all queries of all scales so far gave it (per row and
    head); ``recent`` of the capacity is reserved for the most recent tokens, the rest goes to the heaviest."""

    name = "h2o"

    def __init__(self, budget: float | None = None, recent: float = 0.5) -> None:
        super().__init__(budget)
        if isinstance(recent, bool) or not isinstance(recent, (int, float)) or not 0.0 <= recent <= 1.0:
            raise ValueError(f"recent={recent!r}: expected the share of the capacity kept for recent tokens, in [0, 1]")
        self.recent = float(recent)
        self._mass: list[torch.Tensor | None] = []

    def on_reset(self, layout: CacheLayout) -> None:
        super().on_reset(layout)
        self._mass = [None] * layout.num_layers  # (rows, heads, length) float32 per layer, aligned with the store

    def observe(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> None:
        mass = attention_mass(q, store.k, self.layout.softmax_scale)
        past = self._mass[layer]
        if past is not None:
            mass[..., : past.shape[-1]] += past
        self._mass[layer] = mass

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        return self._mass[layer]

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor:
        n = min(round(self.recent * capacity), store.length)
        return torch.arange(store.length - n, store.length, device=store.k.device)

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV, capacity: int) -> torch.Tensor:
        index = super().select(layer, scale, q, store, capacity)
        self._mass[layer] = self._mass[layer].gather(-1, index)
        return index
