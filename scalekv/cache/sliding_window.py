"""Sliding window: keep the most recent tokens (the paper's weakest baseline)."""

from __future__ import annotations

import torch

from .base import LayerKV, Scale
from .policy import ScoredPolicy
from .registry import register


@register
class SlidingWindow(ScoredPolicy):
    """Score = position in the cache, so the last ``capacity`` tokens survive."""

    name = "sliding_window"

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        rows, heads, length, _ = store.k.shape
        return torch.arange(length, device=store.k.device, dtype=torch.float32).expand(rows, heads, length)
