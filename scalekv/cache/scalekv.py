"""ScaleKV: plan-driven capacities (drafters keep much, refiners little) and grid-window attention scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .base import CacheLayout, LayerKV, Scale
from .plan import PAPER_REFINER_END, PAPER_REFINER_START, Plan, load_plan, rule_plan
from .policy import ScoredPolicy, attention_mass, check_pooling, pool_scores, positive_int
from .registry import register


def grid_window(h: int, w: int, grid: int) -> torch.Tensor:
    """Positions (row-major in an ``h`` x ``w`` map) of the centre token of each cell of a ``grid`` x ``grid``
    split: ``(n,)`` int64 ascending, ``n = min(h, grid) * min(w, grid)``. Along a side of ``s`` tokens, cell ``i``
    covers ``[floor(i s / grid), floor((i + 1) s / grid))`` and its centre is ``start + size // 2``; cells left
    empty by a side shorter than the grid are dropped, so such a side uses each of its rows or columns once."""

    def centres(side: int) -> torch.Tensor:
        cells = torch.arange(grid)
        lo, hi = cells * side // grid, (cells + 1) * side // grid
        return (lo + (hi - lo) // 2)[hi > lo]

    rows, cols = centres(h), centres(w)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


DEFAULT_GRID, DEFAULT_KERNEL, DEFAULT_POOLING = 4, 5, "avg"  # SPEC §5


def check_drafters(drafters) -> list[int] | dict[int, list[int]]:
    """ScaleKV's ``drafters``: a sequence of layer indices, or a mapping scale index -> such a sequence (the range
    of each index is checked against the model when the plan is made)."""

    def layers(value, where: str) -> list[int]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ValueError(
                f"drafters{where}={value!r}: expected a list of layer indices such as [0, 3] "
                "(or a mapping scale -> layer indices)"
            )
        bad = [d for d in value if isinstance(d, bool) or not isinstance(d, int)]
        if bad:
            raise ValueError(f"drafters{where}={list(value)!r}: expected integer layer indices, got {bad[0]!r}")
        return list(value)

    if isinstance(drafters, Mapping):
        bad = [k for k in drafters if isinstance(k, bool) or not isinstance(k, int)]
        if bad:
            raise ValueError(f"drafters={dict(drafters)!r}: expected integer scale indices as keys, got {bad[0]!r}")
        return {k: layers(v, f"[{k}]") for k, v in drafters.items()}
    return layers(drafters, "")


@register
class ScaleKV(ScoredPolicy):
    """ScaleKV (SPEC §5) at the capacities of a plan.

    The plan is ``plan`` (a :class:`~scalekv.cache.plan.Plan` or a plan file: ours or a released budget file), or,
    without a calibrated plan, the SPEC §4 rule for an explicit ``drafters`` list (layers, or scale -> layers) with
    refiners decaying from ``refiner_start`` to ``refiner_end`` times ``B``. ``budget`` may be left out with a plan
    (the plan's is used); given, it must be the plan's.

    Selection: the observation window is the centre token of every cell of a ``grid`` x ``grid`` split of the
    current map; every cached token is scored by the softmax attention of the window's real queries, summed and
    pooled (``pooling`` 'avg' or 'max', ``kernel``); the window is kept, then the top scores, per row and head.
    ``grid``, ``kernel`` and ``pooling`` left out take the plan's ``selection`` (a calibrated plan may carry the
    settings its calibration chose), else SPEC §5's 4, 5 and 'avg'.
    """

    name = "scalekv"

    def __init__(
        self,
        budget: float | None = None,
        plan: Plan | str | Path | None = None,
        drafters: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
        *,
        grid: int | None = None,
        kernel: int | None = None,
        pooling: str | None = None,
        refiner_start: float = PAPER_REFINER_START,
        refiner_end: float = PAPER_REFINER_END,
    ) -> None:
        if (plan is None) == (drafters is None):
            raise ValueError(
                "ScaleKV needs exactly one of plan=<Plan or plan file> and drafters=<layer indices> "
                "(make a plan for your model and budget with `scalekv calibrate`)"
            )
        if drafters is not None:
            drafters = check_drafters(drafters)
        if plan is not None and not isinstance(plan, Plan):
            if not isinstance(plan, (str, Path)):
                raise ValueError(f"plan={plan!r}: expected a Plan or the path of a plan file")
            plan = load_plan(plan)
        if isinstance(plan, Plan):
            if budget is None:
                budget = plan.budget
            elif not (isinstance(budget, (int, float)) and math.isclose(budget, plan.budget, abs_tol=1e-9)):
                raise ValueError(
                    f"budget={budget!r} but the plan was made for budget {plan.budget} "
                    f"({plan.average_capacity:g} tokens per layer); leave budget out or pass {plan.budget}"
                )
        super().__init__(budget)
        chosen = dict(plan.selection) if isinstance(plan, Plan) else {}
        grid = grid if grid is not None else chosen.get("grid", DEFAULT_GRID)
        kernel = kernel if kernel is not None else chosen.get("kernel", DEFAULT_KERNEL)
        pooling = pooling if pooling is not None else chosen.get("pooling", DEFAULT_POOLING)
        check_pooling(pooling, kernel)
        self.fixed_plan = plan
        self.drafters = drafters
        self.grid = positive_int("grid", grid)
        self.kernel, self.pooling = kernel, pooling
        self.refiner_start, self.refiner_end = refiner_start, refiner_end
        self._windows: list[torch.Tensor] = []

    def make_plan(self, layout: CacheLayout) -> Plan:
        if self.fixed_plan is not None:
            return self.fixed_plan
        return rule_plan(
            layout.scales,
            layout.num_layers,
            self.budget,
            self.drafters,
            refiner_start=self.refiner_start,
            refiner_end=self.refiner_end,
        )

    def on_reset(self, layout: CacheLayout) -> None:
        super().on_reset(layout)
        self._windows = [grid_window(s.h, s.w, self.grid) for s in layout.scales]

    def _window(self, scale: Scale, device: torch.device) -> torch.Tensor:
        win = self._windows[scale.index]
        if win.device != device:
            win = self._windows[scale.index] = win.to(device)
        return win

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        obs = q.index_select(2, self._window(scale, q.device))
        mass = attention_mass(obs, store.k, self.layout.softmax_scale)
        return pool_scores(mass, self.kernel, self.pooling)

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor:
        return self._window(scale, store.k.device) + (store.length - scale.length)
