"""A KV store that keeps what is carried to later scales as group-wise quantised integers (8 or 4 bits).

What a layer carries from one scale to the next is quantised when its storage is cut or committed, right after its
attention at that scale. The attention itself always reads its own map at full precision: ``open`` dequantises the
layer's history into a float workspace and writes the current map behind it, and the attention (and a policy's
scoring during ``compress``) reads that workspace. Only one layer is ever dequantised at a time.

Quantisation is asymmetric, per token, in groups of ``group`` channels along ``head_dim`` (default 32, or
``head_dim`` if smaller), for keys and values alike: every group has an fp16 scale and an fp16 zero point, values
``x ~ q * scale + zero`` with ``q`` in ``[0, 2**bits - 1]``; 4-bit codes are packed two per byte (even channel in the
low nibble). Because each token is quantised on its own, re-quantising a kept token's dequantised values gives its
codes back, so a token carried over many scales is not degraded further.

Sink tokens: the first ``sinks`` tokens every (row, head) of a layer holds (default 1: the earliest, which in VAR
and Infinity is the start token the whole generation attends to) are stored one step finer, at 8 bits under 4-bit
storage and in the compute dtype under 8-bit storage. On the demo model this one token per layer lifts ScaleKV 10%
at 4 bits from 27.8 to 34.4 dB PSNR against its 16-bit images, and at 8 bits from 48.3 to 64.4 dB
(``benchmarks/quant_ablation.py``). Kept positions are ascending, so a token dropped from the front hands the sink
role to the next one, which is re-quantised at sink precision.

Memory, all of it allocated at reset and counted in ``peak_bytes``:

* per layer, K and V payload, scale and zero buffers (sinks and the others) sized for the most tokens the plan makes
  the layer keep after any scale (``nbytes`` counts the payload, scales and zeros of the tokens held:
  :meth:`QuantizedKVStore.bytes_for`);
* one float workspace (K and V, the layout's dtype) shared by all layers, sized for the largest history + map of any
  layer at any scale: the transient one-layer full-precision buffer the attention reads.

``keys="channel"`` quantises keys per channel instead (KIVI-style, for keys whose outlier channels spoil a per-token
range): groups of ``group`` consecutive tokens of one channel share a scale and zero point (the last group of a
layer may be shorter and still takes a full group's scale and zero). Every cut re-quantises the layer's kept keys in
new token groups, from their dequantised values. Values stay per token.

Not counted: the temporaries of quantising one layer's kept tokens (at most a few times that layer's workspace).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

KV_BITS = (16, 8, 4)
DEFAULT_GROUP = 32


def check_kv_bits(bits) -> int:
    """Validate ``kv_bits``: 16 (the compute dtype, no quantisation), 8 or 4."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_BITS:
        raise ValueError(f"kv_bits={bits!r}: expected one of {list(KV_BITS)}")
    return bits


KV_KEYS = ("token", "channel")
DEFAULT_SINKS = 1


def sink_bits(bits: int) -> int:
    """Bits of a sink token (one of the earliest a layer holds) when the others are stored at ``bits``: one step
    finer, 4 -> 8 and 8 -> 16 (the compute dtype)."""
    return {4: 8, 8: 16}[bits]


def check_kv_sinks(sinks) -> int:
    """Validate ``kv_sinks``: how many of the earliest tokens of every (row, head) are stored at sink precision."""
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"kv_sinks={sinks!r}: expected an integer >= 0 (tokens kept one step finer)")
    return sinks


def check_kv_keys(keys) -> str:
    """Validate ``kv_keys``: how keys are grouped, ``"token"`` (along head_dim) or ``"channel"`` (along tokens)."""
    if not isinstance(keys, str) or keys not in KV_KEYS:
        raise ValueError(f"kv_keys={keys!r}: expected one of {list(KV_KEYS)}")
    return keys


def group_size(head_dim: int, group: int | None) -> int:
    """The group size for ``head_dim`` channels: ``group`` (must divide ``head_dim``), default min(32, head_dim)."""
    if group is None:
        return min(DEFAULT_GROUP, head_dim)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or head_dim % group:
        raise ValueError(f"kv_group={group!r}: expected a positive group size dividing head_dim={head_dim}")
    return group


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` ``(..., d)`` in groups of ``group`` along the last axis: ``(codes, scale, zero)``, codes uint8
    ``(..., d)`` (8 bits) or ``(..., d // 2)`` (4 bits, packed), scale and zero fp16 ``(..., d // group)``."""
    d = x.shape[-1]
    if d % group or (bits == 4 and d % 2):
        raise ValueError(f"head_dim={d} does not split into groups of {group} (and pairs for 4 bits)")
    levels = (1 << bits) - 1
    g = x.float().reshape(*x.shape[:-1], d // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = ((g - zero.float().unsqueeze(-1)) / s).round_().clamp_(0, levels).to(torch.uint8)
    q = q.reshape(*x.shape[:-1], d)
    if bits == 4:
        q = pack4(q)
    return q, scale, zero


def quantize_channels(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` ``(..., tokens, d)`` per channel in groups of ``group`` tokens along axis -2: codes as
    :func:`quantize`, scale and zero fp16 ``(..., ceil(tokens / group), d)``."""
    t = x.shape[-2]
    groups = -(-t // group)
    pad = groups * group - t
    xf = x.float()
    if pad:  # repeat the last token: it changes no group's range
        xf = torch.cat((xf, xf[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])), dim=-2)
    g = xf.reshape(*x.shape[:-2], groups, group, x.shape[-1])
    levels = (1 << bits) - 1
    lo, hi = g.amin(-2), g.amax(-2)
    scale = ((hi - lo) / levels).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-2)
    q = ((g - zero.float().unsqueeze(-2)) / s).round_().clamp_(0, levels).to(torch.uint8)
    q = q.reshape(*x.shape[:-2], groups * group, x.shape[-1])[..., :t, :]
    if bits == 4:
        q = pack4(q)
    return q, scale, zero


def dequantize_channels(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype, group: int
):
    """The inverse of :func:`quantize_channels` (groups of ``group`` tokens), in ``dtype``."""
    q = unpack4(codes) if bits == 4 else codes
    t = q.shape[-2]
    s = scale.float().repeat_interleave(group, dim=-2)[..., :t, :]
    z = zero.float().repeat_interleave(group, dim=-2)[..., :t, :]
    return (q.float() * s + z).to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype):
    """The inverse of :func:`quantize`, in ``dtype``."""
    q = unpack4(codes) if bits == 4 else codes
    groups = scale.shape[-1]
    g = q.float().reshape(*q.shape[:-1], groups, -1)
    x = g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(q.shape).to(dtype)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes in ``[0, 15]`` ``(..., d)`` -> bytes ``(..., d // 2)``: channel ``2i`` low nibble, ``2i + 1`` high."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack4(b: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack4`."""
    return torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def quant_token_bytes(rows: int, heads: int, head_dim: int, bits: int, group: int) -> int:
    """Bytes of one token's quantised K and V over every row and head: payload + fp16 scales + fp16 zeros."""
    payload = head_dim * bits // 8
    meta = 2 * 2 * (head_dim // group)
    return 2 * rows * heads * (payload + meta)


def quant_bytes(tokens: int, rows: int, heads: int, head_dim: int, bits: int, group: int, keys: str = "token") -> int:
    """Bytes of ``tokens`` quantised tokens (K and V, every row and head). ``keys="channel"``: keys carry one fp16
    scale and zero per channel for every (started) group of ``group`` tokens."""
    if keys == "token":
        return tokens * quant_token_bytes(rows, heads, head_dim, bits, group)
    values = tokens * quant_token_bytes(rows, heads, head_dim, bits, group) // 2
    key_payload = tokens * head_dim * bits // 8
    key_meta = 2 * 2 * head_dim * -(-tokens // group)
    return values + rows * heads * (key_payload + key_meta)


class _Part:
    """A run of one layer's tokens stored at ``bits``: 8 or 4 (codes, fp16 scales and zero points; keys grouped
    ``keys``-wise) or 16 (the layout's dtype, unquantised), for at most ``capacity`` tokens."""

    def __init__(self, store: QuantizedKVStore, bits: int, keys: str, capacity: int) -> None:
        lay = store.layout
        self.bits, self.keys, self.group, self.dtype = bits, keys, store.group, lay.dtype
        self.layout, self.capacity = lay, capacity
        shape, d = (lay.rows, lay.num_heads, capacity), lay.head_dim
        if bits == 16:
            self.data = [torch.empty(*shape, d, dtype=lay.dtype, device=lay.device) for _ in "kv"]
            return
        self.codes = [torch.empty(*shape, d * bits // 8, dtype=torch.uint8, device=lay.device) for _ in "kv"]
        meta = [(*shape, d // self.group)] * 2
        if keys == "channel":
            meta[0] = (lay.rows, lay.num_heads, -(-capacity // self.group), d)
        self.scale = [torch.empty(m, dtype=torch.float16, device=lay.device) for m in meta]
        self.zero = [torch.empty(m, dtype=torch.float16, device=lay.device) for m in meta]

    def bytes_for(self, tokens: int) -> int:
        lay = self.layout
        if self.bits == 16:
            return tokens * lay.token_bytes
        return quant_bytes(tokens, lay.rows, lay.num_heads, lay.head_dim, self.bits, self.group, self.keys)

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self.data) if self.bits == 16 else [*self.codes, *self.scale, *self.zero]

    def read(self, i: int, n: int) -> torch.Tensor:
        """The first ``n`` stored tokens of K (``i`` 0) or V (1), ``(rows, heads, n, head_dim)`` in the dtype."""
        if self.bits == 16:
            return self.data[i][:, :, :n]
        if i == 0 and self.keys == "channel":
            groups = -(-n // self.group)
            args = (self.codes[0][:, :, :n], self.scale[0][:, :, :groups], self.zero[0][:, :, :groups])
            return dequantize_channels(*args, self.bits, self.dtype, self.group)
        return dequantize(
            self.codes[i][:, :, :n], self.scale[i][:, :, :n], self.zero[i][:, :, :n], self.bits, self.dtype
        )

    def write(self, i: int, x: torch.Tensor) -> None:
        """Store ``x`` ``(rows, heads, m, head_dim)`` as K (``i`` 0) or V (1)."""
        m = x.shape[2]
        if self.bits == 16:
            self.data[i][:, :, :m].copy_(x)
            return
        if i == 0 and self.keys == "channel":
            codes, scale, zero = quantize_channels(x, self.bits, self.group)
        else:
            codes, scale, zero = quantize(x, self.bits, self.group)
        self.codes[i][:, :, :m].copy_(codes)
        self.scale[i][:, :, : scale.shape[2]].copy_(scale)
        self.zero[i][:, :, : zero.shape[2]].copy_(zero)


class QuantLayerKV:
    """One layer of a :class:`QuantizedKVStore`. Between ``open`` and the end of its scale ``k``/``v`` are views of
    the float workspace (history dequantised, then the current map); otherwise they dequantise the stored tokens.

    The layer's stored tokens are two parts: its first ``sinks`` tokens (the earliest it holds: kept positions are
    ascending) at ``sink_bits``, the others at ``bits``."""

    def __init__(self, store: QuantizedKVStore, layer: int, capacity: int) -> None:
        self.store, self.layer, self.capacity = store, layer, capacity
        first = min(store.sinks, capacity)
        self.parts = [
            _Part(store, store.sink_bits, "token", first),
            _Part(store, store.bits, store.keys, capacity - first),
        ]
        self.stored = 0  # tokens in the stored parts
        self.length = 0
        self._open = False

    def _split(self, n: int) -> list[int]:
        first = min(n, self.parts[0].capacity)
        return [first, n - first]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens this layer holds (payload, scales and zeros of K and V)."""
        return self.store.bytes_for(self.stored)

    def _history(self, i: int) -> torch.Tensor:
        parts = [p.read(i, n) for p, n in zip(self.parts, self._split(self.stored), strict=True) if n]
        if len(parts) == 1:
            return parts[0]
        if parts:
            return torch.cat(parts, dim=2)
        lay = self.store.layout
        return torch.empty(lay.rows, lay.num_heads, 0, lay.head_dim, dtype=lay.dtype, device=lay.device)

    @property
    def k(self) -> torch.Tensor:
        return self.store.wk[:, :, : self.length] if self._open else self._history(0)

    @property
    def v(self) -> torch.Tensor:
        return self.store.wv[:, :, : self.length] if self._open else self._history(1)

    def open(self, k: torch.Tensor, v: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantise the history into the workspace, write the map ``k``, ``v`` behind it; return the views."""
        store = self.store
        if store.owner is not None:
            raise RuntimeError(f"layer {self.layer} opened while layer {store.owner} still holds the workspace")
        h, n = self.stored, k.shape[2]
        if h + n > store.wk.shape[2]:
            raise RuntimeError(f"layer {self.layer} holds {h + n} tokens, more than the plan it was sized for")
        start = store.clock() if store.timed else 0.0
        for i, w in enumerate((store.wk, store.wv)):
            at = 0
            for part, m in zip(self.parts, self._split(h), strict=True):
                if m:  # dequantised straight into the workspace, part by part
                    w[:, :, at : at + m].copy_(part.read(i, m))
                    at += m
        if store.timed:
            store.codec_seconds += store.clock() - start
        store.wk[:, :, h : h + n].copy_(k)
        store.wv[:, :, h : h + n].copy_(v)
        store.owner, self._open, self._last = self.layer, True, last
        self.length = h + n
        return self.k, self.v

    def _end(self, index: torch.Tensor | None, drop: bool = False) -> None:
        if not self._open:
            raise RuntimeError(f"layer {self.layer} ended without being opened")
        store = self.store
        if drop:
            self.stored = self.length = 0
        else:
            if self._last:
                raise RuntimeError("the last scale's tokens are never kept: end the layer with drop()")
            m = self.length if index is None else index.shape[-1]
            if m > self.capacity:
                raise RuntimeError(f"layer {self.layer} keeps {m} tokens, more than the plan it was sized for")
            for i, w in enumerate((store.wk, store.wv)):
                src = w[:, :, : self.length]
                if index is not None:
                    src = torch.gather(src, 2, index.unsqueeze(-1).expand(-1, -1, -1, w.shape[-1]))
                at, start = 0, store.clock() if store.timed else 0.0
                for part, n in zip(self.parts, self._split(m), strict=True):
                    if n:
                        part.write(i, src[:, :, at : at + n])
                        at += n
                if store.timed:
                    store.codec_seconds += store.clock() - start
            self.stored = self.length = m
        self._open, store.owner = False, None

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens ``index`` ``(rows, heads, m)`` of what the layer holds, quantised."""
        self._end(index)

    def commit(self) -> None:
        """End the scale keeping every token, quantised."""
        self._end(None)

    def drop(self) -> None:
        """End the last scale: nothing of this layer is read again."""
        self._end(None, drop=True)


class QuantizedKVStore:
    """A store with ``bits``-bit (8 or 4) quantised history (see the module notes); ``group``: channels per
    quantisation group (default min(32, head_dim); must divide head_dim); ``keys``: ``"token"`` (default) or
    ``"channel"`` (keys in groups of ``group`` tokens per channel); ``sinks``: how many of the earliest tokens every
    (row, head) of a layer holds are stored one step finer, at :func:`sink_bits` (4 -> 8, 8 -> 16: the compute
    dtype), per token (default :data:`DEFAULT_SINKS`).

    ``codec_seconds``: time spent quantising and dequantising (by :attr:`clock`, on CPU tensors only: on CUDA it
    would need a synchronisation per call, so it stays 0 there)."""

    clock = staticmethod(time.perf_counter)  # a benchmark may pick CPU time (time.process_time)

    def __init__(
        self,
        layout,
        held: Sequence[Sequence[int]],
        *,
        bits: int = 8,
        group: int | None = None,
        keys: str = "token",
        sinks: int | None = None,
    ) -> None:
        if check_kv_bits(bits) == 16:
            raise ValueError("kv_bits=16: the quantised store takes 8 or 4 (16 is scalekv.cache.KVStore)")
        self.keys = check_kv_keys(keys)
        self.sinks = check_kv_sinks(DEFAULT_SINKS if sinks is None else sinks)
        scales = layout.scales
        if len(held) != len(scales) - 1 or any(len(r) != layout.num_layers for r in held):
            raise ValueError(
                f"held lengths for {len(held)} scales; expected {len(scales) - 1} non-last scales x "
                f"{layout.num_layers} layers"
            )
        self.layout, self.bits, self.dtype = layout, bits, layout.dtype
        self.sink_bits = sink_bits(bits)
        self.group = group_size(layout.head_dim, group)
        self.num_layers = layout.num_layers
        # bytes per token, when every token costs the same (per-token keys, no sinks); else see :meth:`bytes_for`
        tb = quant_token_bytes(layout.rows, layout.num_heads, layout.head_dim, bits, self.group)
        self.token_bytes = tb if self.keys == "token" and not self.sinks else None
        caps = [max([1] + [row[l] for row in held]) for l in range(layout.num_layers)]
        work, before = 0, [0] * layout.num_layers
        for k, scale in enumerate(scales):
            work = max(work, max(before) + scale.length)
            before = list(held[k]) if k < len(held) else before
        shape = (layout.rows, layout.num_heads, work, layout.head_dim)
        self.wk = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        self.wv = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        self.layers = [QuantLayerKV(self, l, caps[l]) for l in range(layout.num_layers)]
        self.owner: int | None = None
        self.timed, self.codec_seconds = layout.device.type == "cpu", 0.0
        self.workspace_bytes = 2 * self.wk.numel() * self.wk.element_size()
        self.allocated_bytes = sum(self.bytes_for(c) for c in caps)
        self.peak_bytes = self.allocated_bytes + self.workspace_bytes

    def bytes_for(self, tokens: int) -> int:
        """Bytes of ``tokens`` stored tokens of one layer: the first ``sinks`` at ``sink_bits``, the others at
        ``bits`` (:func:`quant_bytes`)."""
        lay = self.layout
        first = min(tokens, self.sinks)
        rest = quant_bytes(tokens - first, lay.rows, lay.num_heads, lay.head_dim, self.bits, self.group, self.keys)
        if self.sink_bits == 16:
            return first * lay.token_bytes + rest
        return quant_bytes(first, lay.rows, lay.num_heads, lay.head_dim, self.sink_bits, self.group) + rest

    def release(self) -> None:
        """Free the tensors (the byte counts stay)."""
        self.wk = self.wv = None
        for lay in self.layers:
            lay.parts = []
