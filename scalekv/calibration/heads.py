"""Offline per-head statistics for the head-aware policies (HACK, HeatKV, AMS-KV), from full-cache generations.

:func:`collect_head_stats` runs a pipeline's generations through a :class:`HeadStatsCache` (the full cache, which
also measures, at every layer and scale, what :class:`~scalekv.cache.head_stats.HeadStats` holds) and returns the
statistics; save them with :meth:`HeadStats.save`. Only the conditional rows are measured. Attention is streamed
in chunks of queries, so no full attention matrix of a long sequence is held.

Reproduce the shipped demo file with
``scalekv calibrate --model demo --method hack --out scalekv/weights/demo/plans/head_stats.json``
(``--method heatkv`` and ``ams_kv`` write the same file: one pass measures all three).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..cache.base import KVCache, Scale
from ..cache.head_stats import HeadStats

CHUNK_ELEMENTS = 1 << 24  # attention probabilities held at once


class HeadStatsCache(KVCache):
    """The full cache, accumulating per-head statistics of the conditional rows over every generation it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0
        self.sigma = self.scas = self.similarity = None
        self._pairs = 0
        self._previous: list[torch.Tensor | None] = []

    def on_reset(self, layout) -> None:
        layers, heads, scales = layout.num_layers, layout.num_heads, len(layout.scales)
        if self.sigma is None:
            self.schedule = tuple((s.h, s.w) for s in layout.scales)
            self.sigma = torch.zeros(layers, heads, dtype=torch.float64)
            self.scas = torch.zeros(layers, heads, scales, dtype=torch.float64)
            self.similarity = torch.zeros(layers, dtype=torch.float64)
        elif tuple((s.h, s.w) for s in layout.scales) != self.schedule:
            raise ValueError("head statistics are collected on one schedule: every generation must use the same")
        self.images += layout.cond_rows
        self._previous = [None] * layers
        self._ends = torch.tensor([s.end for s in layout.scales], device=layout.device)

    def attend(self, layer: int, scale: Scale, q, k, v):
        rows = self.layout.cond_rows
        cur = k[:rows].float().reshape(rows, k.shape[1], scale.h, scale.w, -1)
        prev = self._previous[layer]
        if prev is not None:
            up = F.interpolate(prev.permute(0, 1, 4, 2, 3).flatten(1, 2), size=(scale.h, scale.w), mode="bilinear")
            up = up.reshape(rows, k.shape[1], -1, scale.h, scale.w).permute(0, 1, 3, 4, 2)
            self.similarity[layer] -= (cur - up).norm(dim=-1).mean(dim=(1, 2, 3)).sum().double().cpu()
            if layer == 0:
                self._pairs += rows
        self._previous[layer] = None if scale.is_last else cur
        out = super().attend(layer, scale, q, k, v)
        self._measure(layer, scale, q[:rows], self.layers[layer].k[:rows])
        return out

    def _measure(self, layer: int, scale: Scale, q: torch.Tensor, k: torch.Tensor) -> None:
        rows, heads, n, _ = q.shape
        length = k.shape[2]
        src = torch.bucketize(torch.arange(length, device=k.device), self._ends, right=True)
        step = max(1, CHUNK_ELEMENTS // max(1, rows * heads * length))
        total = q.new_zeros(rows, heads, length, dtype=torch.float32)
        squares = torch.zeros_like(total)
        kt = k.transpose(-1, -2)
        for i in range(0, n, step):
            p = torch.matmul(q[:, :, i : i + step], kt).float().mul_(self.layout.softmax_scale).softmax(dim=-1)
            total += p.sum(dim=2)
            if scale.is_last:
                squares += p.square().sum(dim=2)
        if scale.is_last:  # HACK: sum over keys of the variance over queries
            var = squares / n - (total / n).square()
            self.sigma[layer] += var.sum(dim=-1).sum(dim=0).double().cpu()
        if scale.index > 0:  # HeatKV: mean attention per source scale, over this scale's queries
            per = torch.zeros(rows, heads, len(self.layout.scales), device=k.device).index_add_(2, src, total / n)
            per[:, :, scale.index :] = 0  # sources are the earlier scales only
            self.scas[layer] += per.sum(dim=0).double().cpu()

    def result(self, model: str = "", provenance: dict | None = None) -> HeadStats:
        if self.sigma is None:
            raise RuntimeError("no generation ran through this cache")
        count = len(self.schedule)
        future = torch.tensor([max(1, count - s - 1) for s in range(count)], dtype=torch.float64)
        scas = self.scas / (self.images * future)
        return HeadStats(
            self.schedule,
            tuple(tuple(round(x, 8) for x in r) for r in (self.sigma / self.images).tolist()),
            tuple(tuple(tuple(round(x, 8) for x in c) for c in r) for r in scas.tolist()),
            tuple(round(x, 8) for x in (self.similarity / max(1, self._pairs)).tolist()),
            model,
            dict(provenance or {}),
        )


def collect_head_stats(
    generate: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    batch_size: int = 16,
    seed: int = 1000,
    model: str = "",
    provenance: dict | None = None,
) -> HeadStats:
    """Run ``generate(batch, cache=..., seed=...)`` over ``inputs`` (class labels or prompts) in batches of
    ``batch_size`` (image ``j`` seeded ``seed + j``) with the full cache, and return the per-head statistics."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    if len(inputs) < 1:
        raise ValueError("inputs=[]: expected at least one calibration label or prompt")
    cache = HeadStatsCache()
    for i in range(0, len(inputs), batch_size):
        with torch.no_grad():
            generate(list(inputs[i : i + batch_size]), cache=cache, seed=seed + i)
    info = {"images": cache.images, "seed": seed, "source": "scalekv calibrate --method hack|heatkv|ams_kv"}
    return cache.result(model, {**info, **(provenance or {})})


def run_cli(args) -> int:
    """``scalekv calibrate --method hack|heatkv|ams_kv``: the head statistics of a VAR model (labels cycling over
    the classes, ``--samples`` images) written to ``--out``; the budget does not enter them."""
    from ..calibration.calibrate import bound_generate, default_inputs
    from ..hub import PROMPTS, default_sampling, input_kind, load_pipeline

    if input_kind(args.model) == PROMPTS:
        raise ValueError(f"--method {args.method} calibrates VAR models here; {args.model!r} is an Infinity model")
    if args.samples < 1 or args.batch_size < 1:
        raise ValueError(f"--samples {args.samples} / --batch-size {args.batch_size}: expected positive integers")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.weights).to(args.device)
    inputs = default_inputs(pipe.model.cfg.num_classes, args.samples)
    generate = bound_generate(pipe.generate, default_sampling(args.model, args.weights))
    stats = collect_head_stats(generate, inputs, batch_size=args.batch_size, seed=args.seed, model=args.model)
    path = stats.save(args.out)
    print(f"head statistics of {args.model} ({stats.num_layers} layers x {stats.num_heads} heads) -> {path}")
    return 0
