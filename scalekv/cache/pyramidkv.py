"""PyramidKV: SnapKV's scores with capacities decreasing linearly with depth (same layer mean)."""

from __future__ import annotations

from .base import CacheLayout
from .plan import Plan, check_beta, pyramid_plan
from .registry import register
from .snapkv import SnapKV


@register
class PyramidKV(SnapKV):
    """The first layer keeps about ``2B - B/beta`` tokens, the last ``B/beta``, linearly in between (capped at what a
    layer holds, the surplus going to the others), so every compressed scale averages ``B``."""

    name = "pyramidkv"

    def __init__(
        self, budget: float | None = None, window: int = 16, kernel: int = 5, pooling: str = "avg", beta: float = 20.0
    ) -> None:
        super().__init__(budget, window, kernel, pooling)
        self.beta = check_beta(beta)

    def make_plan(self, layout: CacheLayout) -> Plan:
        return pyramid_plan(layout.scales, layout.num_layers, self.budget, self.beta)
