"""ScaleKV: plan-driven capacities (drafters keep much, refiners little) and grid-window attention scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import CacheLayout, LayerKV, Scale
from .plan import PAPER_REFINER_END, PAPER_REFINER_START, Plan, load_plan, rule_plan
from .policy import CHUNK_ELEMENTS, ScoredPolicy, attention_mass, pool_scores
from .registry import register
from .settings import (  # noqa: F401  (re-exported: ScaleKV's settings)
    SCORINGS,
    SELECTIONS,
    check_keep_window,
    check_pooling,
    check_scoring,
    check_selection_mode,
    positive_int,
)


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


def release_window(h: int, w: int, grid: int) -> torch.Tensor | None:
    """The published ScaleKV code's observation window in an ``h`` x ``w`` map: ``(grid * grid,)`` int64 positions,
    row-major, ascending, or None where a side is shorter than ``grid`` (the release then takes the most recent
    ``grid * grid`` cached tokens instead, see :meth:`ScaleKV.release_window_at`).

    Along a side of ``s`` tokens with ``p = s // grid``, the centres are ``i * p + (p - 1) // 2``: for even ``p``
    the token just before the middle of the ``p``-token patch (side 24: 2, 8, 14, 20). The tokens past
    ``grid * p`` belong to no patch. Each side is treated alone, so a non-square map gets its own rows and columns
    (the release itself handles only square maps)."""
    if min(h, w) < grid:
        return None

    def centres(side: int) -> torch.Tensor:
        p = side // grid
        return torch.arange(grid) * p + (p - 1) // 2

    return (centres(h)[:, None] * w + centres(w)[None, :]).reshape(-1)


def window_logit_sum(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``sum_i softmax_scale * q_i k^T`` over the queries (raw logits, no softmax): ``(rows, heads, L)`` in the
    inputs' dtype, as the release computes it (logits in that dtype, the sum accumulated in float32 and rounded
    once). ``q``: ``(rows, heads, n, D)``; ``k``: ``(rows, heads, L, D)``; at most :data:`CHUNK_ELEMENTS` logits
    exist at once."""
    rows, heads, n, _ = q.shape
    length = k.shape[2]
    step = max(1, CHUNK_ELEMENTS // max(1, rows * heads * length))
    kt = k.transpose(-1, -2)
    total = torch.zeros(rows, heads, length, dtype=torch.float32, device=q.device)
    for i in range(0, n, step):
        total += torch.matmul(q[:, :, i : i + step], kt).mul_(softmax_scale).sum(dim=2, dtype=torch.float32)
    return total.to(q.dtype)


def release_keep(
    q_window: torch.Tensor,
    k: torch.Tensor,
    window: torch.Tensor,
    capacity: int,
    kernel: int,
    pooling: str,
    softmax_scale: float,
) -> torch.Tensor:
    """The positions the published ScaleKV code keeps, ``(rows, heads, capacity)`` int64 ascending, per row and head.

    ``q_window`` ``(rows, heads, n, D)``: the window's queries; ``k`` ``(rows, heads, L, D)``: every cached key;
    ``window`` ``(n,)``: the window's distinct cache positions. Every key is scored by the window queries' summed
    raw logits; the window positions are set to -inf, the scores pooled along the cache axis (``max``, or the
    release's ``avg``, which counts the padding and lets a window's -inf spread to its neighbours), the window set
    to -inf again, and the window is kept together with the ``capacity - n`` best others, chosen by ``topk`` on the
    whole length as the release calls it, so that equal scores go the same way. Where ``capacity`` is below the
    window (the release crashes there), the window positions with the largest summed logits are kept."""
    length = k.shape[2]
    if not 0 < capacity <= length:
        raise ValueError(f"capacity {capacity} out of range: expected 1..{length} (the tokens held)")
    raw = window_logit_sum(q_window, k, softmax_scale)
    rows, heads, _ = raw.shape
    if capacity <= window.numel():
        top = raw[..., window].topk(capacity, dim=-1).indices
        return window[top].sort(dim=-1).values
    flat = raw.index_fill(-1, window, float("-inf")).reshape(rows * heads, 1, length)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    pooled = pooled.reshape(rows, heads, length).index_fill(-1, window, float("-inf"))
    rest = pooled.topk(capacity - window.numel(), dim=-1).indices
    kept = torch.cat((rest, window.expand(rows, heads, -1)), dim=-1)
    return kept.sort(dim=-1).values


DEFAULT_GRID, DEFAULT_KERNEL, DEFAULT_SELECTION = 4, 5, "spec"  # SPEC §5
DEFAULT_SCORING = {"spec": "mass", "release": "logits"}
DEFAULT_POOLING = {"spec": "avg", "release": "max"}  # SPEC §5; what the release is run with (infer_2b.py)


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

    Selection, per row and head, from the real queries of the current map:

    * ``selection='spec'`` (SPEC §5): the window is the centre token of every cell of a ``grid`` x ``grid`` split
      of the map (:func:`grid_window`); every cached token is scored by the softmax attention of the window's
      queries (``scoring='mass'``) or their raw logits (``'logits'``), summed and pooled (``pooling`` 'avg' or
      'max', ``kernel``); the window is kept (``keep_window=False``: it competes like any token), then the top
      scores.
    * ``selection='release'``: the tokens the published ScaleKV code keeps given these queries and keys: its
      window (:func:`release_window`), raw logits summed without softmax, the window masked before and after the
      pooling, its top-k (:func:`release_keep`). Its pooling defaults to 'max', as the release is run.

    ``selection``, ``grid``, ``kernel``, ``pooling``, ``scoring`` and ``keep_window`` left out take the plan's
    ``selection`` settings (a calibrated plan carries those its calibration chose), else 'spec', 4, 5, 'avg', 'mass'
    and True ('max' and 'logits' for 'release').
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
        selection: str | None = None,
        scoring: str | None = None,
        keep_window: bool | None = None,
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
        selection = selection if selection is not None else chosen.get("selection", DEFAULT_SELECTION)
        self.selection = check_selection_mode(selection)
        grid = grid if grid is not None else chosen.get("grid", DEFAULT_GRID)
        kernel = kernel if kernel is not None else chosen.get("kernel", DEFAULT_KERNEL)
        pooling = pooling if pooling is not None else chosen.get("pooling", DEFAULT_POOLING[selection])
        check_pooling(pooling, kernel)
        scoring = scoring if scoring is not None else chosen.get("scoring", DEFAULT_SCORING[selection])
        self.scoring = check_scoring(scoring, selection)
        keep_window = keep_window if keep_window is not None else chosen.get("keep_window", True)
        self.keep_window = check_keep_window(keep_window, selection)
        self.fixed_plan = plan
        self.drafters = drafters
        self.grid = positive_int("grid", grid)
        self.kernel, self.pooling = kernel, pooling
        self.refiner_start, self.refiner_end = refiner_start, refiner_end
        self._windows: list[torch.Tensor | None] = []

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
        window = grid_window if self.selection == "spec" else release_window
        self._windows = [window(s.h, s.w, self.grid) for s in layout.scales]

    def _window(self, scale: Scale, device: torch.device) -> torch.Tensor | None:
        win = self._windows[scale.index]
        if win is not None and win.device != device:
            win = self._windows[scale.index] = win.to(device)
        return win

    def release_window_at(self, scale: Scale, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The release's window at ``scale`` for a store of ``length`` tokens ending with the scale's map: its cache
        positions ``(n,)`` and the map positions of the queries it scores with ``(n,)``.

        Where a side is shorter than the grid, the release falls back to the most recent ``grid * grid`` cached
        tokens (fewer if fewer are held); those before the current map are scored with the map's first query, as
        the release clamps their query positions."""
        local = self._window(scale, device)
        start = length - scale.length
        if local is not None:
            return local + start, local
        count = min(self.grid * self.grid, length)
        positions = torch.arange(length - count, length, device=device)
        return positions, (positions - start).clamp_(0, scale.length - 1)

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV, capacity: int) -> torch.Tensor:
        if self.selection == "spec":
            return super().select(layer, scale, q, store, capacity)
        window, queries = self.release_window_at(scale, store.length, q.device)
        obs = q.index_select(2, queries)
        return release_keep(obs, store.k, window, capacity, self.kernel, self.pooling, self.layout.softmax_scale)

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        obs = q.index_select(2, self._window(scale, q.device))
        if self.scoring == "logits":
            scores = window_logit_sum(obs, store.k, self.layout.softmax_scale).float()
        else:
            scores = attention_mass(obs, store.k, self.layout.softmax_scale)
        return pool_scores(scores, self.kernel, self.pooling)

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor | None:
        if not self.keep_window:
            return None
        return self._window(scale, store.k.device) + (store.length - scale.length)
