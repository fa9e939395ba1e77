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
"""

from __future__ import annotations

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


class KVCache:
    """The full KV cache: keeps every token. Policies subclass it and override ``capacity`` and ``select``."""

    name = "full"

    def __init__(self) -> None:
        self.layout: CacheLayout | None = None
        self.layers: list[LayerKV] = []
        self.nbytes = 0
        self.peak_nbytes = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self, layout: CacheLayout) -> None:
        """Forget everything and prepare for a generation with ``layout``."""
        self.layout = layout
        self.layers = [LayerKV() for _ in range(layout.num_layers)]
        self.nbytes = 0
        self.peak_nbytes = 0
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
        """Called right after the layer's attention at ``scale`` with the queries it used."""
        if scale.is_last:
            return  # the last scale's cache is never read again
        store = self.layers[layer]
        cap = self.capacity(layer, scale)
        if cap is None or store.length <= cap:
            return
        index = self.select(layer, scale, q, store, cap)
        self.nbytes += store.keep(index)

    # -- what a policy overrides -------------------------------------------------------------------------------
    def capacity(self, layer: int, scale: Scale) -> int | None:
        """Tokens ``layer`` keeps for the scales after ``scale``; None keeps everything."""
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
