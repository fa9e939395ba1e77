"""The plumbing every compressing policy shares, written once.

* :class:`Policy`: a budget, a :class:`~scalekv.cache.plan.Plan` built per generation (``capacity`` reads it).
* :class:`ScoredPolicy`: ``select`` = score every cached token per (row, head), force a few positions in, take the
  top ``capacity``, keep positions in order. A scorer implements only :meth:`ScoredPolicy.score` (and, if it forces
  tokens in, :meth:`ScoredPolicy.forced`).
* :func:`attention_mass`, :func:`pool_scores` and :func:`keep_top`: the tensor helpers behind them.

Everything is vectorised over rows, heads and tokens; CFG rows are scored and selected independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CacheLayout, KVCache, LayerKV, Scale
from .head_store import HeadStore
from .plan import Plan, uniform_plan
from .settings import check_pooling, positive_int  # noqa: F401  (policies import them from here)

# attention probabilities materialised at once by attention_mass, in elements (bounds its working memory)
CHUNK_ELEMENTS = 1 << 26


class Policy(KVCache):
    """A compressing cache with a budget fraction; its capacities come from :meth:`make_plan`."""

    compresses = True

    def __init__(self, budget: float | None = None) -> None:
        if budget is None:
            raise ValueError(f"the {self.name!r} policy needs budget=<a fraction in (0, 1]>")
        super().__init__(budget)
        self.plan: Plan | None = None  # built at every reset
        self._capacities: tuple[tuple[int, ...], ...] = ()

    def on_reset(self, layout: CacheLayout) -> None:
        plan = self.make_plan(layout)
        plan.check_layout(layout)
        if plan.heads is not None and plan.num_heads != layout.num_heads:
            raise ValueError(f"the plan gives {plan.num_heads} heads per layer, but the model has {layout.num_heads}")
        self.plan = plan
        self._capacities = plan.heads if plan.heads is not None else plan.capacities

    def make_plan(self, layout: CacheLayout) -> Plan:
        """The capacities for this generation; uniform unless a policy says otherwise."""
        return uniform_plan(layout.scales, layout.num_layers, self.budget)

    def capacity(self, layer: int, scale: Scale) -> int | tuple[int, ...]:
        return self._capacities[scale.index][layer]


class HeadAwarePolicy(Policy):
    """A policy that gives heads their own counts (a per-head store) from per-head statistics: a statistics file
    (``calibration``, made by ``scalekv calibrate --method <name>``) or, instead, an explicit stand-in the subclass
    names (``explicit``, described by ``wanted`` in the error, after an optional ``note``)."""

    default_store = HeadStore
    title = ""  # the policy's name in errors

    def __init__(self, budget, calibration, explicit, wanted: str, note: str = "") -> None:
        if (calibration is None) == (explicit is None):
            raise ValueError(
                f"{self.title} needs exactly one of calibration=<head statistics file> and {wanted} "
                f"({note}make the statistics with `scalekv calibrate --method {self.name}`)"
            )
        super().__init__(budget)
        from .head_stats import load_head_stats

        self.stats = load_head_stats(calibration) if calibration is not None else None


class ScoredPolicy(Policy):
    """Keep the forced positions plus the best-scoring others, per (row, head)."""

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV, capacity: int) -> torch.Tensor:
        scores = self.score(layer, scale, q, store)
        return keep_top(scores, capacity, self.forced(layer, scale, store, capacity))

    def score(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> torch.Tensor:
        """Importance of every cached token, ``(rows, heads, store.length)``; higher is kept first.

        ``q`` ``(rows, heads, h*w, head_dim)`` are the queries the layer just used; the store ends with the
        current scale's ``h*w`` tokens."""
        raise NotImplementedError

    def forced(self, layer: int, scale: Scale, store: LayerKV, capacity: int) -> torch.Tensor | None:
        """Store positions ``(n,)`` (int64, on the store's device) kept in every row and head before any other."""
        return None


def keep_top(scores: torch.Tensor, capacity: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(rows, heads, capacity)`` of the kept tokens, ascending: the ``forced`` positions first (if there
    are more of them than ``capacity``, the best-scoring of them), then the best-scoring others.

    ``scores``: ``(rows, heads, L)`` float; ``forced``: ``(n,)`` distinct positions in ``[0, L)``.
    """
    length = scores.shape[-1]
    if not 0 < capacity <= length:
        raise ValueError(f"capacity {capacity} out of range: expected 1..{length} (the tokens held)")
    if forced is not None and forced.numel():
        if forced.numel() >= capacity:
            top = scores[..., forced].topk(capacity, dim=-1, sorted=False).indices
            return forced[top].sort(dim=-1).values
        scores = scores.index_fill(-1, forced, float("inf"))
    return scores.topk(capacity, dim=-1, sorted=False).indices.sort(dim=-1).values


def attention_mass(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``sum_i softmax(softmax_scale * q_i k^T)`` over the queries: ``(rows, heads, L)`` float32.

    ``q``: ``(rows, heads, n, D)`` observation queries; ``k``: ``(rows, heads, L, D)`` cached keys. The queries are
    processed in chunks of at most ``D / 4`` queries (and :data:`CHUNK_ELEMENTS` probabilities), so that the scores
    and their softmax together never take more memory than the keys they score: a policy's working set stays below
    one layer's KV.
    """
    rows, heads, n, dim = q.shape
    length = k.shape[2]
    step = max(1, min(CHUNK_ELEMENTS // max(1, rows * heads * length), dim // 4))
    kt = k.transpose(-1, -2)
    total = q.new_zeros(rows, heads, length, dtype=torch.float32)
    for i in range(0, n, step):
        logits = torch.matmul(q[:, :, i : i + step], kt).float().mul_(softmax_scale)
        total += logits.softmax(dim=-1).sum(dim=2)
    return total


def pool_scores(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Smooth ``(rows, heads, L)`` scores along the tokens with a 1-D ``avg`` or ``max`` pool of odd ``kernel``
    (stride 1, same length; the average ignores the padding)."""
    if kernel == 1:
        return scores
    rows, heads, length = scores.shape
    flat = scores.reshape(rows * heads, 1, length)
    if mode == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    elif mode == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling={mode!r}: expected 'avg' or 'max'")
    return out.reshape(rows, heads, length)
