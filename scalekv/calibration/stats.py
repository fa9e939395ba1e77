"""Attention statistics for ASI calibration, measured from the layers' real attention, streamed in chunks.

For layer ``l`` at scale ``k``, with ``a_ij`` the head-averaged softmax attention from query ``i`` of the current map
to key ``j``, the collector accumulates over all queries of the current map (and all rows, CFG halves included):

* ``current(l, k)`` = mean_i sum_{j in current map} a_ij  -- share of attention on the current map
* ``topk(l, k)``    = mean_i (sum of the ``top_k`` largest a_ij over the history)  -- history mass ``top_k`` tokens keep

No (L x L) matrix is ever held: queries are processed ``query_chunk`` at a time and heads ``head_chunk`` at a time,
so the working set is ``rows * head_chunk * query_chunk * L`` scores plus a ``rows * query_chunk * L`` head average.
"""

from __future__ import annotations

import torch

from ..cache.base import CacheLayout, KVCache, check_budget
from ..cache.plan import average_capacity
from ..schedules import Scale


class AttentionStatsCache(KVCache):
    """A full cache that measures attention statistics in :meth:`compress` and keeps them across generations.

    ``top_k`` is K' of SPEC §3 (history tokens a refiner could keep). Give it in tokens, or give ``history_budget``
    instead, a budget fraction whose layer-average capacity B (SPEC §4) on the schedule of the first generation
    becomes K' (the usual choice). Sums live in float64 tensors of shape (scales, layers); :meth:`means` divides by
    the query counts.
    """

    name = "attention_stats"

    def __init__(
        self,
        top_k: int | None = None,
        *,
        history_budget: float | None = None,
        query_chunk: int = 256,
        head_chunk: int = 4,
    ) -> None:
        super().__init__()
        if (top_k is None) == (history_budget is None):
            raise ValueError("give exactly one of top_k (K' in tokens) and history_budget (K' = B of that budget)")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k={top_k!r}: expected a positive number of history tokens")
        if history_budget is not None:
            check_budget(history_budget)
        for name, value in (("query_chunk", query_chunk), ("head_chunk", head_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive chunk size")
        self.top_k, self.history_budget = top_k, history_budget
        self.query_chunk, self.head_chunk = query_chunk, head_chunk
        self.current_sum: torch.Tensor | None = None
        self.topk_sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.generations = 0
        self._signature: tuple | None = None

    def on_reset(self, layout: CacheLayout) -> None:
        signature = (layout.num_layers, tuple((s.h, s.w) for s in layout.scales))
        if self._signature is None:
            if self.top_k is None:
                self.top_k = average_capacity(self.history_budget, layout.scales)
            shape = (len(layout.scales), layout.num_layers)
            # on the model's device, so that accumulating never synchronises with the host
            self.current_sum = torch.zeros(shape, dtype=torch.float64, device=layout.device)
            self.topk_sum = torch.zeros(shape, dtype=torch.float64, device=layout.device)
            self.count = torch.zeros(shape, dtype=torch.float64)
            self._signature = signature
        elif signature != self._signature:
            raise ValueError(
                f"calibration statistics were collected for (layers, schedule) {self._signature}; "
                f"this generation has {signature}"
            )
        self.generations += 1

    def compress(self, layer: int, scale: Scale, q: torch.Tensor) -> None:
        store = self.layers[layer]
        current, topk = attention_shares(
            q, store.k, scale.start, self.layout.softmax_scale, self.top_k, self.query_chunk, self.head_chunk
        )
        self.current_sum[scale.index, layer] += current
        self.topk_sum[scale.index, layer] += topk
        self.count[scale.index, layer] += q.shape[0] * q.shape[2]
        super().compress(layer, scale, q)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(current, topk)``, each (scales, layers): the per-query means of the two statistics."""
        if self.count is None:
            raise RuntimeError("no calibration generation has run through this collector yet")
        count = self.count.to(self.current_sum.device)
        return (self.current_sum / count).cpu(), (self.topk_sum / count).cpu()


def attention_shares(
    q: torch.Tensor,
    k: torch.Tensor,
    history: int,
    softmax_scale: float,
    top_k: int,
    query_chunk: int,
    head_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over rows and queries of the current-map share and the top-``top_k`` history mass (0-d float64 tensors
    on q's device, so that nothing waits for the device).

    q: (rows, heads, n, D) queries of the current map; k: (rows, heads, L, D) keys, the first ``history`` of which
    are earlier scales and the last ``n`` the current map. The softmax is over all L keys, averaged over heads.
    """
    rows, heads, n, _ = q.shape
    length = k.shape[2]
    if length != history + n:
        raise ValueError(f"keys hold {length} tokens; expected history {history} + current {n}")
    kk = min(top_k, history)
    current_total = q.new_zeros((), dtype=torch.float64)
    topk_total = q.new_zeros((), dtype=torch.float64)
    for q0 in range(0, n, query_chunk):
        qc = q[:, :, q0 : q0 + query_chunk].float()
        mean = q.new_zeros(rows, qc.shape[2], length, dtype=torch.float32)
        for h0 in range(0, heads, head_chunk):
            logits = torch.matmul(qc[:, h0 : h0 + head_chunk], k[:, h0 : h0 + head_chunk].float().transpose(-1, -2))
            mean += logits.mul_(softmax_scale).softmax(dim=-1).sum(dim=1)
        mean /= heads
        current_total += mean[..., history:].sum(dtype=torch.float64)
        if kk > 0:
            topk_total += mean[..., :history].topk(kk, dim=-1).values.sum(dtype=torch.float64)
    return current_total, topk_total
