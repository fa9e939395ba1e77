"""StreamingLLM: a few first ("sink") tokens plus the most recent ones."""

from __future__ import annotations

import torch

from .base import LayerKV, Scale
from .policy import ScoredPolicy, positive_int
from .registry import register


@register
class StreamingLLM(ScoredPolicy):
    """Keep the first ``sinks`` cached tokens (the start token and its neighbours) and fill the rest with the most
    recent tokens. The sinks stay at the front of the cache, so they are its first positions at every scale."""

    name = "streaming_llm"

    def __init__(self, budget: float | None = None, sinks: int = 4) -> None:
        super().__init__(budget)
        self.sinks = positive_int("sinks", sinks)

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        rows, heads, length, _ = store.k.shape
        return torch.arange(length, device=store.k.device, dtype=torch.float32).expand(rows, heads, length)

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor:
        return torch.arange(min(self.sinks, store.length), device=store.k.device)
