"""The KV cache every model hands its attention to, and the storage behind it.

Protocol (one cache object per generation, created by the caller):

* ``reset(layout)`` is called by the generation loop before the first scale; it drops all state, so a cache object
  may be reused and nothing leaks between two generations.
* In every self-attention layer at every scale the attention calls
  ``k_all, v_all = cache.update(layer, scale, q, k, v)`` with the current scale's real queries, keys and values,
  shaped ``(rows, heads, h*w, head_dim)`` exactly as the attention uses them (after normalisation, the learned scale
  and, for Infinity, RoPE). It attends over what it gets back.
* After that attention it calls ``cache.compress(layer, scale, q)`` with the same queries; a policy may then shrink
  the layer's storage for the next scale. The base class never compresses: it is the full cache.

Policies override :meth:`KVCache.capacity` (tokens to keep) and :meth:`KVCache.select` (which tokens); the models
never see a policy. Rows are ``[cond; uncond]`` under classifier-free guidance and are treated independently.

Attention logits are ``layout.softmax_scale * q @ k^T``: the queries carry the learned scale, and the models with
normalised q, k (VAR ``attn_l2_norm``, Infinity ``cos_attn``) attend with ``softmax_scale = 1``.

Accounting lives here, computed from what the cache holds: current and peak KV bytes, retained tokens and bytes per
layer after every scale, and the seconds spent compressing (``compress_seconds``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scale:
    """One step of a next-scale schedule: the token map of side ``h`` x ``w`` that starts at ``start``."""

    index: int
    h: int
    w: int
    start: int
    is_last: bool

    @property
    def length(self) -> int:
        """Tokens in this scale's map."""
        return self.h * self.w

    @property
    def end(self) -> int:
        """Tokens of this and all earlier scales (the uncompressed prefix after this scale)."""
        return self.start + self.length


def make_scales(sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> tuple[Scale, ...]:
    """Turn a schedule of ``(h, w)`` map sizes into :class:`Scale` records."""
    scales, start = [], 0
    for i, (h, w) in enumerate(sizes):
        if h < 1 or w < 1:
            raise ValueError(f"scale {i} has size {h}x{w}; expected positive sides")
        scales.append(Scale(i, int(h), int(w), start, i == len(sizes) - 1))
        start += h * w
    return tuple(scales)


@dataclass(frozen=True)
class CacheLayout:
    """What a generation will put into the cache, known before the first scale."""

    num_layers: int
    num_heads: int
    head_dim: int
    scales: tuple[Scale, ...]
    rows: int  # batch rows held by the cache, CFG halves included
    cond_rows: int  # the first ``cond_rows`` rows are conditional, the rest unconditional
    softmax_scale: float = 1.0  # the attention computes softmax(softmax_scale * q @ k^T) over what it is given

    @property
    def total_tokens(self) -> int:
        return self.scales[-1].end

    def full_bytes(self, element_size: int) -> int:
        """KV bytes of the uncompressed cache after the last scale (K and V, every layer)."""
        return 2 * self.num_layers * self.rows * self.total_tokens * self.num_heads * self.head_dim * element_size


class LayerKV:
    """Keys and values of one layer, ``(rows, heads, tokens, head_dim)``, every head holding the same length.

    All storage changes go through :meth:`append` and :meth:`keep`, which report the byte delta, so a later
    preallocated or quantised store can replace this class without touching the cache logic.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Append new tokens along the token axis; returns the bytes added."""
        before = self.nbytes
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.nbytes - before

    def keep(self, index: torch.Tensor) -> int:
        """Keep the tokens ``index`` ``(rows, heads, n)`` per row and head; returns the bytes added (<= 0)."""
        before = self.nbytes
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        self.k = torch.gather(self.k, 2, gather)
        self.v = torch.gather(self.v, 2, gather)
        return self.nbytes - before


def check_budget(budget: float) -> float:
    """Validate a KV budget fraction: a real number in (0, 1]; returns it as a float."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget={budget!r}: expected a fraction in (0, 1]")
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget!r}: expected a fraction in (0, 1]")
    return float(budget)


class KVCache:
    """The full KV cache: keeps every token. Policies subclass it and override ``capacity`` and ``select``.

    ``budget`` is the fraction of the prefix a policy keeps on average per layer (SPEC §4); the full cache accepts
    only 1.0. Subclasses that compress set ``compresses = True``.
    """

    name = "full"
    compresses = False
    clock = staticmethod(time.perf_counter)  # what compress_seconds is measured with (a benchmark may pick CPU time)

    def __init__(self, budget: float = 1.0) -> None:
        self.budget = check_budget(budget)
        if not self.compresses and self.budget != 1.0:
            raise ValueError(
                f"budget={budget!r}: the {self.name!r} cache keeps every token, expected 1.0 "
                "(pick a compressing policy)"
            )
        self.layout: CacheLayout | None = None
        self.layers: list[LayerKV] = []
        self.nbytes = 0
        self.peak_nbytes = 0
        self.compress_seconds = 0.0
        self.scale_lengths: list[list[int]] = []
        self.scale_nbytes: list[list[int]] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self, layout: CacheLayout) -> None:
        """Forget everything and prepare for a generation with ``layout``."""
        self.layout = layout
        self.layers = [LayerKV() for _ in range(layout.num_layers)]
        self.nbytes = 0
        self.peak_nbytes = 0
        self.compress_seconds = 0.0
        self.scale_lengths = [[0] * layout.num_layers for _ in layout.scales]
        self.scale_nbytes = [[0] * layout.num_layers for _ in layout.scales]
        self.on_reset(layout)

    def on_reset(self, layout: CacheLayout) -> None:
        """Hook for policies that precompute per-generation state (plans, window indices)."""

    # -- what the attention calls ------------------------------------------------------------------------------
    def update(
        self, layer: int, scale: Scale, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the current scale's ``k``, ``v`` ``(rows, heads, h*w, head_dim)``; return all keys and values
        the current queries attend over (retained history followed by the current map)."""
        if self.layout is None:
            raise RuntimeError("the cache was not reset for a generation: call cache.reset(layout) first")
        store = self.layers[layer]
        self.nbytes += store.append(k, v)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        return store.k, store.v

    def compress(self, layer: int, scale: Scale, q: torch.Tensor) -> None:
        """Called right after the layer's attention at ``scale`` with the queries it used: cut the layer's storage
        to ``capacity(layer, scale)`` tokens (never after the last scale, whose cache is never read again)."""
        store = self.layers[layer]
        if self.compresses and not scale.is_last:
            sync = q.is_cuda
            if sync:
                torch.cuda.synchronize(q.device)
            start = self.clock()
            self.observe(layer, scale, q, store)
            cap = self.capacity(layer, scale)
            if cap is not None and store.length > cap:
                index = self.select(layer, scale, q, store, cap)
                expected = (store.k.shape[0], store.k.shape[1], cap)
                if tuple(index.shape) != expected:
                    raise RuntimeError(f"{type(self).__name__}.select gave {tuple(index.shape)}, expected {expected}")
                self.nbytes += store.keep(index)
            if sync:
                torch.cuda.synchronize(q.device)
            self.compress_seconds += self.clock() - start
        self.scale_lengths[scale.index][layer] = store.length
        self.scale_nbytes[scale.index][layer] = store.nbytes

    # -- what a policy overrides -------------------------------------------------------------------------------
    def observe(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV) -> None:
        """Called at every scale but the last, before any selection, for policies that accumulate statistics."""

    def capacity(self, layer: int, scale: Scale) -> int | None:
        """Tokens ``layer`` keeps for the scales after ``scale``; None keeps everything.

        One number per layer: every head keeps the same count (per-head capacities would return one per head)."""
        return None

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store: LayerKV, capacity: int) -> torch.Tensor:
        """Indices ``(rows, heads, capacity)`` of the tokens to keep, sorted ascending per row and head."""
        raise NotImplementedError(f"{type(self).__name__} sets a capacity but does not implement select()")

    # -- accounting --------------------------------------------------------------------------------------------
    def lengths(self) -> list[int]:
        """Retained tokens per layer."""
        return [s.length for s in self.layers]

    def layer_nbytes(self) -> list[int]:
        """Retained KV bytes per layer."""
        return [s.nbytes for s in self.layers]
