"""The KV cache every model hands its attention to, and the storage behind it.

Protocol (one cache object per generation, created by the caller):

* ``reset(layout)`` is called by the generation loop before the first scale; it drops all state, so a cache object
  may be reused and nothing leaks between two generations.
* In every self-attention layer at every scale the attention calls ``out = cache.attend(layer, scale, q, k, v)``
  with the current scale's real queries, keys and values, shaped ``(rows, heads, h*w, head_dim)`` exactly as the
  attention uses them (after normalisation, the learned scale and, for Infinity, RoPE), and gets the attention
  output back: the cache attends over its history plus the current map, per head when its heads hold different
  lengths (:mod:`scalekv.cache.head_store`). ``k_all, v_all = cache.update(...)`` returns the dense keys and values
  instead, for stores whose heads agree.
* After that attention it calls ``cache.compress(layer, scale, q)`` with the same queries; a policy may then shrink
  the layer's storage for the next scale. The base class never compresses: it is the full cache.

Policies override :meth:`KVCache.capacity` (tokens to keep: one count per layer, or one per head) and
:meth:`KVCache.select` (which tokens); the models
never see a policy. Rows are ``[cond; uncond]`` under classifier-free guidance and are treated independently.

Attention logits are ``layout.softmax_scale * q @ k^T``: the queries carry the learned scale, and the models with
normalised q, k (VAR ``attn_l2_norm``, Infinity ``cos_attn``) attend with ``softmax_scale = 1``.

Storage is a replaceable store (:mod:`scalekv.cache.store`), allocated once per generation at ``reset`` from the
plan's lengths. Accounting lives here: ``nbytes`` (KV bytes held now), ``peak_nbytes`` (``kv_bytes_peak``: the most KV
bytes alive at once, the store's allocation and its scratch), tokens and bytes every layer holds after every scale
(``scale_lengths``, ``scale_nbytes``; zero after the last scale, whose map is never stored), ``history_nbytes``
(``kv_bytes_history``) and the seconds spent compressing (``compress_seconds``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schedules import Scale, make_scales  # noqa: F401  (re-exported: the cache API names them)
from .store import KVStore, LayerKV  # noqa: F401  (LayerKV: the type policies read)


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
    dtype: torch.dtype = torch.float32  # what the attention computes in (the autocast dtype under autocast)
    device: torch.device = torch.device("cpu")

    @property
    def total_tokens(self) -> int:
        return self.scales[-1].end

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V over every row and head, in :attr:`dtype`."""
        return 2 * self.rows * self.num_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def reference_bytes(self) -> int:
        """``kv_bytes_reference``: what the official implementation's full cache holds at the end of a generation
        (every token of every scale, every layer, K and V in the compute dtype)."""
        return self.num_layers * self.total_tokens * self.token_bytes


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype a model with parameter ``param`` computes its attention in: the autocast dtype when autocast is on
    for the parameter's device, else the parameter's dtype."""
    kind = param.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return param.dtype


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
    only 1.0. Subclasses that compress set ``compresses = True``. Storage (the store class, ``kv_bits``) and timing
    are set by :meth:`configure`, for every policy alike (``make_cache(name, ..., store=..., kv_bits=...)``).
    """

    name = "full"
    compresses = False
    default_store: Callable = KVStore  # what the policy stores in unless configured otherwise
    clock = staticmethod(time.perf_counter)  # what compress_seconds is measured with (a benchmark may pick CPU time)

    def __init__(self, budget: float = 1.0) -> None:
        self.budget = check_budget(budget)
        if not self.compresses and self.budget != 1.0:
            raise ValueError(
                f"budget={budget!r}: the {self.name!r} cache keeps every token, expected 1.0 "
                "(pick a compressing policy)"
            )
        self.store_class, self.timing, self.kv_bits, self.kv_group, self.kv_keys = (
            self.default_store,
            None,
            16,
            None,
            "token",
        )
        self.kv_sinks: int | None = None
        self.layout: CacheLayout | None = None
        self.store = None
        self.layers: list = []
        self.nbytes = 0
        self.peak_nbytes = 0
        self.compress_seconds = 0.0
        self.scale_lengths: list[list[int]] = []
        self.scale_nbytes: list[list[int]] = []

    def configure(
        self,
        *,
        store: Callable | None = None,
        timing: bool | None = None,
        kv_bits: int | None = None,
        kv_group: int | None = None,
        kv_keys: str | None = None,
        kv_sinks: int | None = None,
    ) -> KVCache:
        """Set the storage and the timing mode (every policy has them; ``make_cache`` passes them here).

        ``kv_bits``: 16 keeps K/V in the compute dtype (:class:`~scalekv.cache.store.KVStore`, the default); 8 or 4
        carries them between scales quantised (:class:`~scalekv.cache.quant_store.QuantizedKVStore`), ``kv_group``
        channels per group (default min(32, head_dim); checked against head_dim at reset), ``kv_keys`` how keys are
        grouped: ``"token"`` (default, along head_dim like values) or ``"channel"`` (``kv_group`` tokens per channel),
        ``kv_sinks`` how many of the earliest tokens of every (row, head) a layer holds are stored one step finer
        (4 -> 8 bits, 8 -> the compute dtype; default 1); a per-head policy quantises each head's arena of its
        :class:`~scalekv.cache.head_store.HeadStore` alike. An explicit ``store`` cannot be combined with 8 or 4
        bits."""
        from .head_store import HeadStore
        from .quant_store import QuantizedKVStore, check_kv_bits, check_kv_keys, check_kv_sinks, group_size

        if store is not None and not callable(store):
            raise ValueError(f"store={store!r}: expected a store class such as scalekv.cache.KVStore")
        if timing is not None and not isinstance(timing, bool):
            raise ValueError(f"timing={timing!r}: expected True, False or None")
        if kv_bits is not None:
            self.kv_bits = check_kv_bits(kv_bits)
        if kv_group is not None:
            group_size(kv_group, kv_group)  # a positive integer (divisibility is checked at reset)
            self.kv_group = kv_group
        if kv_keys is not None:
            self.kv_keys = check_kv_keys(kv_keys)
        if kv_sinks is not None:
            self.kv_sinks = check_kv_sinks(kv_sinks)
        if store is not None and self.kv_bits != 16:
            raise ValueError(f"store={store!r} with kv_bits={self.kv_bits}: a custom store cannot be quantised")
        if self.kv_bits != 16 and self.default_store not in (KVStore, HeadStore):
            raise ValueError(
                f"kv_bits={self.kv_bits}: the {self.name!r} policy stores in {self.default_store.__name__}, which "
                "is not quantised; expected kv_bits=16"
            )
        if store is not None:
            self.store_class = store
        elif any(x is not None for x in (kv_bits, kv_group, kv_keys, kv_sinks)):
            if self.kv_bits == 16:
                if self.kv_group is not None or self.kv_keys != "token" or self.kv_sinks is not None:
                    raise ValueError(
                        f"kv_group={self.kv_group!r}, kv_keys={self.kv_keys!r}, kv_sinks={self.kv_sinks!r}: only "
                        "with kv_bits 8 or 4"
                    )
                self.store_class = self.default_store
            else:
                bits, group, keys, sinks = self.kv_bits, self.kv_group, self.kv_keys, self.kv_sinks

                def quantized(layout, held):
                    return QuantizedKVStore(layout, held, bits=bits, group=group, keys=keys, sinks=sinks)

                # a per-head policy keeps its HeadStore, every head's arena quantised alike
                per_head = self.default_store is HeadStore
                self.store_class = functools.partial(HeadStore, head_store=quantized) if per_head else quantized
        self.timing = timing
        return self

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self, layout: CacheLayout) -> None:
        """Forget everything and prepare for a generation with ``layout``: the policy makes its plan, then the
        store is allocated for it."""
        self.layout = layout
        self.store = self.layers = None
        self.nbytes = 0
        self.compress_seconds = 0.0
        self.scale_lengths = [[0] * layout.num_layers for _ in layout.scales]
        self.scale_nbytes = [[0] * layout.num_layers for _ in layout.scales]
        self.on_reset(layout)
        self.held = self.planned_lengths(layout)
        self.store = self.store_class(layout, self.held)
        self.layers = self.store.layers
        self.peak_nbytes = self.store.peak_bytes

    def on_reset(self, layout: CacheLayout) -> None:
        """Hook for policies that precompute per-generation state (plans, window indices)."""

    def planned_lengths(self, layout: CacheLayout) -> list[list]:
        """Tokens every layer keeps after every scale but the last (what the store is sized for), from
        :meth:`capacity`: one count per layer, or a tuple of one per head where the capacity is per head."""
        held, before = [], [0] * layout.num_layers
        for scale in layout.scales[:-1]:
            row = []
            for layer in range(layout.num_layers):
                cap = self.capacity(layer, scale) if self.compresses else None
                past = before[layer]
                if isinstance(cap, tuple) or isinstance(past, tuple):
                    past = past if isinstance(past, tuple) else (past,) * layout.num_heads
                    caps = cap if isinstance(cap, tuple) else (cap,) * layout.num_heads
                    row.append(
                        tuple(
                            p + scale.length if c is None else min(c, p + scale.length)
                            for p, c in zip(past, caps, strict=True)
                        )
                    )
                else:
                    total = past + scale.length
                    row.append(total if cap is None else min(cap, total))
            held.append(row)
            before = row
        return held

    def release(self) -> None:
        """Free the stored tensors once a generation has run its last scale (the accounting stays)."""
        if self.store is not None:
            self.store.release()

    # -- what the attention calls ------------------------------------------------------------------------------
    def attend(self, layer: int, scale: Scale, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Put the current scale's ``k``, ``v`` behind the layer's history and return the attention of ``q`` over
        both, ``(rows, heads, h*w, head_dim)``, with ``layout.softmax_scale`` (per head on a per-head store)."""
        if self.layout is None:
            raise RuntimeError("the cache was not reset for a generation: call cache.reset(layout) first")
        store = self.layers[layer]
        if not hasattr(store, "attend"):
            k_all, v_all = self.update(layer, scale, q, k, v)
            return F.scaled_dot_product_attention(q, k_all, v_all, scale=self.layout.softmax_scale)
        before = store.nbytes
        out = store.attend(q, k, v, scale.is_last, self.layout.softmax_scale)
        self.nbytes += store.nbytes - before
        return out

    def update(
        self, layer: int, scale: Scale, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the current scale's ``k``, ``v`` ``(rows, heads, h*w, head_dim)`` behind the layer's history; return
        all keys and values the current queries attend over (history followed by the current map). At the last
        scale the map is attended over in place and never stored."""
        if self.layout is None:
            raise RuntimeError("the cache was not reset for a generation: call cache.reset(layout) first")
        store = self.layers[layer]
        before = store.nbytes
        k_all, v_all = store.open(k, v, scale.is_last)
        self.nbytes += store.nbytes - before
        return k_all, v_all

    def compress(self, layer: int, scale: Scale, q: torch.Tensor) -> None:
        """Called right after the layer's attention at ``scale`` with the queries it used: cut the layer's storage
        to ``capacity(layer, scale)`` tokens (never after the last scale, whose keys are dropped instead)."""
        store = self.layers[layer]
        before = store.nbytes
        if scale.is_last:
            store.drop()
        elif self.compresses:
            timed = self.timing if self.timing is not None else not q.is_cuda
            if timed and q.is_cuda:
                torch.cuda.synchronize(q.device)
            start = self.clock() if timed else 0.0
            self.observe(layer, scale, q, store)
            cap = self.capacity(layer, scale)
            if isinstance(cap, tuple):
                self._keep_per_head(layer, scale, q, store, cap)
            elif cap is not None and store.length > cap:
                index = self.select(layer, scale, q, store, cap)
                expected = (q.shape[0], q.shape[1], cap)
                if tuple(index.shape) != expected:
                    raise RuntimeError(f"{type(self).__name__}.select gave {tuple(index.shape)}, expected {expected}")
                store.keep(index)
            else:
                store.commit()
            if timed:
                if q.is_cuda:
                    torch.cuda.synchronize(q.device)
                self.compress_seconds += self.clock() - start
        else:
            store.commit()
        self.nbytes += store.nbytes - before
        self.peak_nbytes = self.store.peak_bytes
        self.scale_lengths[scale.index][layer] = store.length
        self.scale_nbytes[scale.index][layer] = store.nbytes

    def _keep_per_head(self, layer: int, scale: Scale, q: torch.Tensor, store, caps: tuple[int, ...]) -> None:
        lengths = getattr(store, "lengths", None)
        if lengths is None:
            raise RuntimeError(
                f"{type(self).__name__} gives per-head capacities: it needs a per-head store (HeadStore)"
            )
        if all(n <= c for n, c in zip(lengths, caps, strict=True)):
            store.commit()
            return
        caps = tuple(min(n, c) for n, c in zip(lengths, caps, strict=True))
        index = self.select(layer, scale, q, store, caps)
        got = [tuple(i.shape) for i in index]
        expected = [(q.shape[0], c) for c in caps]
        if got != expected:
            raise RuntimeError(f"{type(self).__name__}.select gave per-head shapes {got}, expected {expected}")
        store.keep(index)

    # -- what a policy overrides -------------------------------------------------------------------------------
    def observe(self, layer: int, scale: Scale, q: torch.Tensor, store) -> None:
        """Called at every scale but the last, before any selection, for policies that accumulate statistics."""

    def capacity(self, layer: int, scale: Scale) -> int | tuple[int, ...] | None:
        """Tokens ``layer`` keeps for the scales after ``scale``; None keeps everything.

        One number for the layer (every head keeps the same count), or a tuple of one per head (on a per-head
        store)."""
        return None

    def select(self, layer: int, scale: Scale, q: torch.Tensor, store, capacity):
        """Indices ``(rows, heads, capacity)`` of the tokens to keep, sorted ascending per row and head; for a
        per-head ``capacity`` tuple, a list of one ``(rows, capacity[h])`` tensor per head."""
        raise NotImplementedError(f"{type(self).__name__} sets a capacity but does not implement select()")

    # -- accounting --------------------------------------------------------------------------------------------
    @property
    def history_nbytes(self) -> int:
        """``kv_bytes_history``: what the last scale reads besides its own map (every layer's history)."""
        return sum(self.scale_nbytes[-2]) if len(self.scale_nbytes) > 1 else 0

    def lengths(self) -> list[int]:
        """Tokens every layer holds now."""
        return [s.length for s in self.layers]

    def layer_nbytes(self) -> list[int]:
        """KV bytes every layer holds now."""
        return [s.nbytes for s in self.layers]
