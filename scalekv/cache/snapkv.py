"""SnapKV: the last tokens of the current scale vote, with pooled attention, under a uniform capacity."""

from __future__ import annotations

import torch

from .base import LayerKV, Scale
from .policy import ScoredPolicy, attention_mass, check_pooling, pool_scores, positive_int
from .registry import register


@register
class SnapKV(ScoredPolicy):
    """Observation window = the last ``window`` tokens of the current map (all of it when smaller). Every cached
    token is scored by the softmax attention those queries gave it, summed and pooled (``pooling``, ``kernel``);
    the window itself is always kept."""

    name = "snapkv"

    def __init__(self, budget: float | None = None, window: int = 16, kernel: int = 5, pooling: str = "avg") -> None:
        super().__init__(budget)
        check_pooling(pooling, kernel)
        self.window = positive_int("window", window)
        self.kernel, self.pooling = kernel, pooling

    def _window(self, scale: Scale) -> int:
        return min(self.window, scale.length)

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        obs = q[:, :, -self._window(scale) :]
        mass = attention_mass(obs, store.k, self.layout.softmax_scale)
        return pool_scores(mass, self.kernel, self.pooling)

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor:
        return torch.arange(store.length - self._window(scale), store.length, device=store.k.device)
