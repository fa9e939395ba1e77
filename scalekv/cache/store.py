"""Where a cache keeps its keys and values: one buffer per generation, sized from the plan, written in place.

The cache makes a store at every ``reset`` from the layout and the plan's lengths (``held[k][l]``: tokens layer ``l``
keeps after scale ``k``, for every scale but the last, whose keys are never stored). The store is the only place
KV tensors live, so a quantised or per-head store can replace it without touching the cache logic. A store class
takes ``(layout, held)`` and offers per-layer :class:`LayerKV` objects (``open``, ``keep``, ``commit``, ``drop``,
views ``k``/``v``, ``length``, ``nbytes``), ``layers``, ``peak_bytes`` and ``release()``.

:class:`KVStore`, the default, allocates one K and one V tensor ``(rows, heads, tokens, head_dim)`` in the layout's
dtype and device at reset and never again. Its token axis works as two stacks. At the start of every scale the
layers' histories lie packed from the bottom in reverse layer order, layer 0 on top, so that

* layer ``l`` (on top when its turn comes) gets its current map written right behind its history and attends over
  the two in place: no history is ever copied for the attention;
* its kept tokens are compacted onto a second stack growing down from the top of the buffer, after which its old
  place is free for the next layer's map;
* at the last scale nothing is kept: the map is attended over in place and the layer's tokens are dropped;
* after the last layer of a scale the top stack, which holds the layers in the same order, is moved down to the
  bottom for the next scale (one in-place copy of the history per scale).

The buffer's size is the most tokens alive at once: for every scale and layer, the unprocessed histories plus the
current map plus what the processed layers kept (:func:`arena_tokens`). Copies between overlapping places go in
chunks of at most :data:`CHUNK_TOKENS` tokens, the only scratch there is, in the direction that never overwrites a
token still to be read (kept positions are ascending).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_TOKENS = 64  # copy scratch: at most this many tokens exist twice at once


def arena_tokens(held: Sequence[Sequence[int]], map_lengths: Sequence[int]) -> int:
    """Tokens a :class:`KVStore` needs for a generation where layer ``l`` keeps ``held[k][l]`` tokens after scale
    ``k`` (every scale but the last) and scale ``k`` has ``map_lengths[k]`` tokens: the largest, over scales and
    layers, of the histories not yet processed + the current map + what the processed layers already kept."""
    layers = len(held[0]) if held else 0
    before = [0] * layers
    most = 0
    for k, m in enumerate(map_lengths):
        after = held[k] if k < len(held) else [0] * layers
        waiting, done = sum(before), 0
        for l in range(layers):
            most = max(most, waiting + m + done)
            waiting -= before[l]
            done += after[l]
        most = max(most, done)
        before = list(after)
    return most


class LayerKV:
    """One layer's keys and values inside a :class:`KVStore`: ``k``/``v`` are ``(rows, heads, length, head_dim)``
    views of what the layer holds (between ``open`` and the end of its scale, its history and the current map)."""

    def __init__(self, store: KVStore, layer: int) -> None:
        self.store, self.layer = store, layer
        self.start = 0  # where the layer's tokens begin on the store's token axis
        self.length = 0

    @property
    def k(self) -> torch.Tensor:
        return self.store.k[:, :, self.start : self.start + self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.store.v[:, :, self.start : self.start + self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens this layer holds now."""
        return self.length * self.store.token_bytes

    def open(self, k: torch.Tensor, v: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current map ``k``, ``v`` ``(rows, heads, n, head_dim)`` behind the history; return the views the
        attention reads. ``last``: this is the last scale (its map is never kept)."""
        self.store.begin_layer(self, last)
        at, n = self.start + self.length, k.shape[2]
        self.store.k[:, :, at : at + n].copy_(k)
        self.store.v[:, :, at : at + n].copy_(v)
        self.length += n
        return self.k, self.v

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens ``index`` ``(rows, heads, m)`` (ascending per row and head) of what the layer holds."""
        self.store.end_layer(self, index)

    def commit(self) -> None:
        """End the scale keeping every token."""
        self.store.end_layer(self, None)

    def drop(self) -> None:
        """End the last scale: nothing of this layer is read again."""
        self.store.end_layer(self, None, drop=True)


class KVStore:
    """The default store: one preallocated K and V tensor for the whole generation (see the module notes).

    ``max_bytes`` refuses, at reset, a plan whose storage would exceed it."""

    def __init__(self, layout, held: Sequence[Sequence[int]], *, max_bytes: int | None = None) -> None:
        scales = layout.scales
        if len(held) != len(scales) - 1 or any(len(r) != layout.num_layers for r in held):
            raise ValueError(
                f"held lengths for {len(held)} scales; expected {len(scales) - 1} non-last scales x "
                f"{layout.num_layers} layers"
            )
        if any(isinstance(e, (tuple, list)) for row in held for e in row):
            raise ValueError(
                "the plan gives heads of a layer different capacities: KVStore holds one count per layer; "
                "expected store=scalekv.cache.HeadStore"
            )
        before = [0] * layout.num_layers
        for k, scale in enumerate(scales[:-1]):
            for l in range(layout.num_layers):
                if not 1 <= held[k][l] <= before[l] + scale.length:
                    raise ValueError(
                        f"the plan keeps {held[k][l]} tokens of layer {l} after scale {k}, which holds "
                        f"{before[l] + scale.length}: expected 1..{before[l] + scale.length}"
                    )
            before = list(held[k])
        self.num_layers = layout.num_layers
        self.token_bytes = layout.token_bytes
        self.tokens = arena_tokens(held, [s.length for s in scales])
        scratch = min(CHUNK_TOKENS, self.tokens)
        need = self.tokens * self.token_bytes + scratch * self.token_bytes // 2
        if max_bytes is not None and need > max_bytes:
            raise ValueError(
                f"this plan needs {need} bytes of KV storage ({self.tokens} tokens of "
                f"{self.token_bytes} bytes, plus {scratch} of scratch); the store was limited to max_bytes={max_bytes}"
            )
        shape = (layout.rows, layout.num_heads, self.tokens, layout.head_dim)
        self.k = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        self.v = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        self.layers = [LayerKV(self, l) for l in range(layout.num_layers)]
        self.allocated_bytes = self.tokens * self.token_bytes
        self.peak_bytes = need  # the buffer and one chunk of copy scratch: the most KV bytes alive at once
        self._next = 0  # the layer whose turn it is
        self._top = 0  # end of the bottom stack (the histories still to process)
        self._down = self.tokens  # start of the top stack (what this scale's processed layers kept)
        self._open = False

    # -- the stack discipline ----------------------------------------------------------------------------------
    def begin_layer(self, layer: LayerKV, last: bool) -> None:
        if layer.layer != self._next or self._open:
            raise RuntimeError(
                f"layer {layer.layer} opened while layer {self._next} is due: a store serves layers 0..L-1 in order, "
                "one open and one keep/commit/drop each, at every scale"
            )
        if layer.start + layer.length != self._top:
            raise RuntimeError(f"layer {layer.layer} is not on top of the store's stack")
        self._open, self._last = True, last

    def end_layer(self, layer: LayerKV, index: torch.Tensor | None, drop: bool = False) -> None:
        if not self._open or layer.layer != self._next:
            raise RuntimeError(f"layer {layer.layer} ended without being opened")
        start, length = layer.start, layer.length
        self._top = start  # its place is free once its kept tokens have moved up
        if drop:
            layer.start = layer.length = 0
        else:
            if self._last:
                raise RuntimeError("the last scale's tokens are never kept: end the layer with drop()")
            kept = length if index is None else index.shape[-1]
            dest = self._down - kept
            if dest < start:
                raise RuntimeError(f"layer {layer.layer} keeps {kept} tokens, more than the plan it was sized for")
            if index is None:
                self._move(start, dest, length)
            else:
                self._gather_up(start, length, index, dest)
            self._down, layer.start, layer.length = dest, dest, kept
        self._open = False
        self._next += 1
        if self._next == self.num_layers:  # scale done: the top stack moves down, layer 0 ends up on top
            shift, self._next = self._down, 0
            used = self.tokens - self._down
            if used and shift:
                self._move(self._down, 0, used)
            for lay in self.layers:
                if lay.length:
                    lay.start -= shift
            self._top, self._down = used, self.tokens

    def _move(self, src: int, dst: int, n: int) -> None:
        """Copy tokens ``[src, src + n)`` to ``[dst, dst + n)`` in chunks, safe when the two overlap."""
        if src == dst or n == 0:
            return
        step = min(CHUNK_TOKENS, n)
        order = range(0, n, step) if dst < src else reversed(range(0, n, step))
        for i in order:
            w = min(step, n - i)
            for buf in (self.k, self.v):
                buf[:, :, dst + i : dst + i + w].copy_(buf[:, :, src + i : src + i + w].clone())

    def _gather_up(self, src: int, length: int, index: torch.Tensor, dst: int) -> None:
        """Write the tokens ``index`` of ``[src, src + length)`` to ``[dst, dst + m)``, ``dst`` at or above where
        each comes from: last chunk first, so no chunk overwrites a token a later one reads."""
        m = index.shape[-1]
        step = min(CHUNK_TOKENS, m)
        dim = self.k.shape[-1]
        for i in reversed(range(0, m, step)):
            part = index[..., i : i + step]
            w = part.shape[-1]
            gather = part.unsqueeze(-1).expand(-1, -1, -1, dim)
            for buf in (self.k, self.v):
                chunk = torch.gather(buf[:, :, src : src + length], 2, gather)
                buf[:, :, dst + i : dst + i + w].copy_(chunk)

    def release(self) -> None:
        """Free the tensors (the byte counts stay)."""
        self.k = self.v = None


class ConcatLayer:
    """One layer of :class:`ConcatStore`."""

    def __init__(self) -> None:
        self.k = self.v = None
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def open(self, k, v, last):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        self.length = self.k.shape[2]
        return self.k, self.v

    def keep(self, index):
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        self.k, self.v = self.k.gather(2, gather), self.v.gather(2, gather)
        self.length = index.shape[-1]

    def commit(self):
        pass

    def drop(self):
        self.k = self.v = None
        self.length = 0


class ConcatStore:
    """The textbook store: ``torch.cat`` on every append and ``gather`` on every keep, a new tensor each time. It
    gives the same images as :class:`KVStore` bit for bit (tested), so it is the reference for other stores and
    the baseline the benchmarks time the preallocated store against. It reports no peak (``peak_bytes`` 0)."""

    def __init__(self, layout, held) -> None:
        self.layers = [ConcatLayer() for _ in range(layout.num_layers)]
        self.peak_bytes = 0

    def release(self) -> None:
        self.layers = []
