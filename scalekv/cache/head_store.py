"""A store where every head of a layer holds its own number of tokens, and every kept token its source position.

:class:`HeadStore` takes the same ``(layout, held)`` as :class:`~scalekv.cache.store.KVStore`, where an entry
``held[k][l]`` may be one count for the layer (every head alike) or a tuple of one count per head. Each head has its
own preallocated two-stack arena (a :class:`KVStore` of one head, sized from that head's counts), so its memory is
the tokens the head keeps, never padded to the longest head of its layer. ``kv_bytes_peak`` is the sum of the heads'
arenas and copy scratch; ``nbytes`` counts the tokens held.

Every kept token carries its source position in the generation (``positions[h]``, ``(rows, length_h)`` int32;
:meth:`HeadLayer.source_scales` gives the scale index), gathered along with K and V, so a policy can tell scales
apart after any number of cuts. The tags are bookkeeping, not KV: they are not counted in the KV bytes.

The attention over heads of different lengths (:func:`ragged_attention`) runs, on CPU, one SDPA per head written
into one output (``"loop"``: no head's K/V is ever copied, and one head's output exists twice at most; ``"auto"``
stacks the heads into one SDPA when their lengths agree, ~6% faster there but at the cost of a copy of the layer's
K/V: docs/head_aware.md), or one call over all heads on CUDA (``"pad"``: one SDPA over the heads padded to the
longest with a mask, only for the attention; ``"flex"``: one FlexAttention call over the packed heads). The mode is
:data:`ATTENTION_MODE` per device type unless the store is made with ``attention=...``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .store import KVStore

ATTENTION_MODES = ("auto", "group", "loop", "pad", "flex")
ATTENTION_MODE = {"cpu": "loop", "cuda": "pad"}  # the default per device type (others: "loop")


def check_attention_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in ATTENTION_MODES:
        raise ValueError(f"attention={mode!r}: expected one of {list(ATTENTION_MODES)}")
    return mode


def head_counts(entry, heads: int) -> tuple[int, ...]:
    """A plan entry (one count for the layer, or one per head) as one count per head."""
    if isinstance(entry, (tuple, list)):
        if len(entry) != heads:
            raise ValueError(f"per-head counts {list(entry)}: expected one per head ({heads})")
        return tuple(entry)
    return (entry,) * heads


def ragged_attention(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], softmax_scale: float, mode: str = "group"
) -> torch.Tensor:
    """``softmax(softmax_scale * q k_h^T) v_h`` for every head ``h``: ``(rows, heads, n, D)``.

    ``q``: ``(rows, heads, n, D)``; ``ks[h]``, ``vs[h]``: ``(rows, 1, L_h, D)``, the lengths ``L_h`` free.
    ``mode``: ``"auto"`` (one SDPA over the stacked heads when every length agrees, else one per head), ``"group"``
    (one SDPA per set of heads of equal length, their K/V stacked), ``"loop"`` (one SDPA per head), ``"pad"`` (one
    SDPA over the heads padded to the longest, a mask hiding the padding) or ``"flex"`` (one FlexAttention call
    over all heads packed end to end)."""
    heads = q.shape[1]
    lengths = [k.shape[2] for k in ks]
    if mode == "auto":
        mode = "group" if len(set(lengths)) == 1 else "loop"
    if mode == "loop" or (mode == "group" and len(set(lengths)) == heads):
        # Written head by head into (rows, n, heads, D), returned as a (rows, heads, n, D) view: one head's result
        # exists twice at most, and the model's transpose back to (rows, n, heads * D) is a view, not a copy.
        rows, _, n, dim = q.shape
        out = q.new_empty(rows, n, heads, dim)
        for h in range(heads):
            out[:, :, h] = F.scaled_dot_product_attention(q[:, h : h + 1], ks[h], vs[h], scale=softmax_scale)[:, 0]
        return out.transpose(1, 2)
    if mode == "group":
        groups: dict[int, list[int]] = {}
        for h, n in enumerate(lengths):
            groups.setdefault(n, []).append(h)
        if len(groups) == 1:
            return F.scaled_dot_product_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), scale=softmax_scale)
        rows, _, n, dim = q.shape
        out = q.new_empty(rows, n, heads, dim)  # as in "loop": the model's transpose back is a view
        for members in groups.values():
            idx = torch.tensor(members, device=q.device)
            k = torch.cat([ks[h] for h in members], 1)
            v = torch.cat([vs[h] for h in members], 1)
            out[:, :, idx] = F.scaled_dot_product_attention(q[:, idx], k, v, scale=softmax_scale).transpose(1, 2)
        return out.transpose(1, 2)
    if mode == "pad":
        longest = max(lengths)
        rows, _, _, dim = q.shape
        k = q.new_zeros(rows, heads, longest, dim)
        v = q.new_zeros(rows, heads, longest, dim)
        for h in range(heads):
            k[:, h, : lengths[h]] = ks[h][:, 0]
            v[:, h, : lengths[h]] = vs[h][:, 0]
        valid = torch.arange(longest, device=q.device) < torch.tensor(lengths, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[None, :, None, :], scale=softmax_scale)
    if mode == "flex":
        return _flex_attention(q, ks, vs, softmax_scale, lengths)
    raise ValueError(f"attention={mode!r}: expected one of {list(ATTENTION_MODES)}")


def _flex_attention(q, ks, vs, softmax_scale, lengths):
    """All (row, head) sequences packed into one, a document mask keeping each query on its own head's keys."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows, heads, n, dim = q.shape
    k = torch.cat([x.transpose(0, 1).reshape(1, -1, dim) for x in ks], 1)  # head-major, then row, then token
    v = torch.cat([x.transpose(0, 1).reshape(1, -1, dim) for x in vs], 1)
    dev = q.device
    q_doc = torch.arange(heads * rows, device=dev).repeat_interleave(n)
    k_doc = torch.cat(
        [torch.arange(h * rows, (h + 1) * rows, device=dev).repeat_interleave(lengths[h]) for h in range(heads)]
    )

    def same_head(b, hh, qi, ki):
        return q_doc[qi] == k_doc[ki]

    qp = q.transpose(0, 1).reshape(1, 1, heads * rows * n, dim)
    mask = create_block_mask(same_head, 1, 1, qp.shape[2], k.shape[1], device=str(dev))
    out = flex_attention(qp, k[:, None], v[:, None], block_mask=mask, scale=softmax_scale)
    return out.reshape(heads, rows, n, dim).transpose(0, 1)


class HeadLayer:
    """One layer of a :class:`HeadStore`: ``heads[h]`` is head ``h``'s storage (``k``/``v`` ``(rows, 1, L_h, D)``
    views), ``positions[h]`` ``(rows, L_h)`` the source positions of its tokens, ``lengths`` the counts."""

    def __init__(self, store: HeadStore, layer: int) -> None:
        self.store, self.layer = store, layer
        self.heads = [s.layers[layer] for s in store.per_head]
        self.positions: list[torch.Tensor | None] = [None] * len(self.heads)
        self._scale = 0  # the scale this layer opens next

    @property
    def lengths(self) -> list[int]:
        return [h.length for h in self.heads]

    @property
    def length(self) -> int | float:
        """Tokens the layer holds, in tokens of every head: the mean over heads (an int when they agree)."""
        lengths = self.lengths
        total = sum(lengths)
        return total // len(lengths) if total % len(lengths) == 0 else total / len(lengths)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.heads)

    def _dense(self, which: str) -> torch.Tensor:
        if len(set(self.lengths)) > 1:
            raise RuntimeError(
                f"layer {self.layer}'s heads hold {self.lengths} tokens: read them per head (heads[h].k, heads[h].v)"
            )
        return torch.cat([getattr(h, which) for h in self.heads], dim=1)

    @property
    def k(self) -> torch.Tensor:
        """``(rows, heads, L, D)``, a copy; only while every head holds the same count."""
        return self._dense("k")

    @property
    def v(self) -> torch.Tensor:
        return self._dense("v")

    def source_scales(self, h: int) -> torch.Tensor:
        """The scale index every token of head ``h`` comes from, ``(rows, L_h)`` int32."""
        return torch.bucketize(self.positions[h], self.store.scale_ends(self.positions[h].device), right=True)

    def open_heads(self, k: torch.Tensor, v: torch.Tensor, last: bool) -> tuple[list, list]:
        """Write the current map behind every head's history; return the per-head views the attention reads."""
        scale = self.store.scales[self._scale]
        self._scale += 1
        rows, _, n, _ = k.shape
        here = torch.arange(scale.start, scale.end, device=k.device, dtype=torch.int32).expand(rows, n).contiguous()
        ks, vs = [], []
        for h, head in enumerate(self.heads):
            kh, vh = head.open(k[:, h : h + 1], v[:, h : h + 1], last)
            ks.append(kh)
            vs.append(vh)
            past = self.positions[h]
            self.positions[h] = here if past is None else torch.cat((past, here), dim=1)
        return ks, vs

    def open(self, k: torch.Tensor, v: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = self.open_heads(k, v, last)
        if len({x.shape[2] for x in ks}) > 1:
            raise RuntimeError(
                f"layer {self.layer}'s heads hold different lengths: the attention must go through cache.attend"
            )
        return torch.cat(ks, 1), torch.cat(vs, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: bool, softmax_scale: float):
        """Open the current map and attend over every head's history plus the map: ``(rows, heads, n, D)``."""
        ks, vs = self.open_heads(k, v, last)
        mode = self.store.attention or ATTENTION_MODE.get(q.device.type, "loop")
        return ragged_attention(q, ks, vs, softmax_scale, mode)

    def keep(self, index) -> None:
        """Keep, per head, the tokens ``index[h]`` ``(rows, m_h)`` (ascending); ``index`` may also be one
        ``(rows, heads, m)`` tensor."""
        if len(index) != len(self.heads) if isinstance(index, (list, tuple)) else index.shape[1] != len(self.heads):
            raise RuntimeError(f"keep() got indices for a different number of heads than {len(self.heads)}")
        for h, head in enumerate(self.heads):
            idx = index[h] if isinstance(index, (list, tuple)) else index[:, h]
            if idx.shape[-1] == head.length:
                head.commit()
                continue
            head.keep(idx.unsqueeze(1))
            self.positions[h] = self.positions[h].gather(1, idx)

    def commit(self) -> None:
        for head in self.heads:
            head.commit()

    def drop(self) -> None:
        for head in self.heads:
            head.drop()
        self.positions = [None] * len(self.heads)
        self._scale = 0


class HeadStore:
    """Per-head storage (see the module notes): ``held[k][l]`` is one count or one count per head.

    ``attention``: the ragged attention mode (:data:`ATTENTION_MODES`); default per device type. ``head_store``:
    the store each head's arena is, called as ``head_store(one_head_layout, counts)``: :class:`KVStore` (default), or
    a quantised one (``make_cache(..., kv_bits=8)`` on a per-head policy passes
    :class:`~scalekv.cache.quant_store.QuantizedKVStore` with its settings)."""

    def __init__(
        self, layout, held: Sequence[Sequence], *, attention: str | None = None, head_store: Callable = KVStore
    ) -> None:
        if len(held) != len(layout.scales) - 1 or any(len(r) != layout.num_layers for r in held):
            raise ValueError(
                f"held lengths for {len(held)} scales; expected {len(layout.scales) - 1} non-last scales x "
                f"{layout.num_layers} layers"
            )
        self.attention = None if attention is None else check_attention_mode(attention)
        heads = layout.num_heads
        per = [[head_counts(e, heads) for e in row] for row in held]
        one = dataclasses.replace(layout, num_heads=1)
        self.per_head = [head_store(one, [[e[h] for e in row] for row in per]) for h in range(heads)]
        self.scales = layout.scales
        self._ends: dict[torch.device, torch.Tensor] = {}
        self.layers = [HeadLayer(self, layer) for layer in range(layout.num_layers)]
        self.peak_bytes = sum(s.peak_bytes for s in self.per_head)
        self.allocated_bytes = sum(s.allocated_bytes for s in self.per_head)

    @property
    def codec_seconds(self) -> float:
        """Time the heads' quantised arenas spent quantising and dequantising (0 for plain arenas)."""
        return sum(getattr(s, "codec_seconds", 0.0) for s in self.per_head)

    def scale_ends(self, device: torch.device) -> torch.Tensor:
        if device not in self._ends:
            self._ends[device] = torch.tensor([s.end for s in self.scales], device=device, dtype=torch.int32)
        return self._ends[device]

    def release(self) -> None:
        for s in self.per_head:
            s.release()
