"""What every generator shares: the result type, its memory figures, and the loop around the model-specific step.

Memory figures (one definition each, used by ``Generation``, ``stats.json``, eval rows and the benchmarks):

* ``kv_bytes_history``: KV bytes the last scale reads besides its own map (every layer's history after the
  second-to-last scale);
* ``kv_bytes_peak``: the most KV bytes alive at once over the whole generation (the store's allocation, made once at
  reset and sized from the plan, plus its compaction scratch);
* ``kv_bytes_reference``: what the official implementation's full cache holds at the end (every token of every
  scale, every layer, K and V in the compute dtype);
* ``kv_history_ratio`` = history / reference and ``kv_peak_ratio`` = peak / reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .cache.base import CacheLayout, KVCache
from .checks import check_seed, check_seeds
from .schedules import Scale


@dataclass
class ScaleRecord:
    """What one scale did: its tokens and what the cache holds right after it."""

    index: int
    h: int
    w: int
    tokens: torch.Tensor  # (B, h*w) int64 ids (VAR) or (B, h*w, d) uint8 bits (Infinity)
    cache_lengths: list[int]  # tokens every layer holds after this scale (all zero after the last scale)
    kv_bytes: int  # KV bytes held after this scale
    kv_bytes_per_layer: list[int]  # the same per layer


@dataclass
class Generation:
    """A batch of generated images and how the cache behaved."""

    images: torch.Tensor  # (B, 3, H, W) float32 RGB in [0, 1]
    scales: list[ScaleRecord]
    f_hat: torch.Tensor  # the latent the images were decoded from
    kv_bytes_history: int
    kv_bytes_peak: int
    kv_bytes_reference: int
    seconds: float
    compress_seconds: float = 0.0
    policy: str = "full"
    budget: float = 1.0
    average_capacity: float = 0.0  # B: tokens per layer on average (the plan's; the whole prefix for the full cache)
    logits: list[torch.Tensor] | None = field(default=None, repr=False)  # guided logits per scale, if kept

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat([s.tokens for s in self.scales], dim=1)

    @property
    def kv_history_ratio(self) -> float:
        return self.kv_bytes_history / self.kv_bytes_reference

    @property
    def kv_peak_ratio(self) -> float:
        return self.kv_bytes_peak / self.kv_bytes_reference

    def memory(self) -> dict:
        """The memory figures under their one set of names (see the module notes)."""
        return {
            "kv_bytes_history": self.kv_bytes_history,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_bytes_reference": self.kv_bytes_reference,
            "kv_history_ratio": self.kv_history_ratio,
            "kv_peak_ratio": self.kv_peak_ratio,
        }

    def stats(self) -> dict:
        """Everything ``stats.json``, eval rows and the demo table report about this generation's cache and time."""
        return {
            "policy": self.policy,
            "budget": self.budget,
            "average_capacity": self.average_capacity,
            **self.memory(),
            "seconds": self.seconds,
            "compress_seconds": self.compress_seconds,
            "cache_lengths_per_scale": [s.cache_lengths for s in self.scales],
            "kv_bytes_per_scale_and_layer": [s.kv_bytes_per_layer for s in self.scales],
        }


class GenerationLoop:
    """The part of ``generate`` every model shares: cache checks and reset, timing, per-scale records, releasing
    the cache before decoding, and the result. A pipeline calls :meth:`record` after every scale, :meth:`finish`
    after the last one (before its decoder runs) and :meth:`result` with the decoded images."""

    def __init__(self, cache: KVCache | None) -> None:
        cache = cache if cache is not None else KVCache()
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a scalekv KVCache, got {type(cache).__name__}")
        self.cache = cache
        self.records: list[ScaleRecord] = []
        self.start = time.perf_counter()

    def begin(self, layout: CacheLayout) -> None:
        """Reset the cache for this generation (the policy plans, the store is allocated); the clock starts."""
        self.start = time.perf_counter()
        self.cache.reset(layout)

    def record(self, scale: Scale, tokens: torch.Tensor) -> None:
        c = self.cache
        self.records.append(ScaleRecord(scale.index, scale.h, scale.w, tokens, c.lengths(), c.nbytes, c.layer_nbytes()))

    def finish(self) -> None:
        """After the last scale: the cache's tensors are freed before the decoder runs."""
        self.cache.release()

    def result(self, images: torch.Tensor, f_hat: torch.Tensor, logits: list | None) -> Generation:
        c = self.cache
        plan = getattr(c, "plan", None)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return Generation(
            images=images.float(),
            scales=self.records,
            f_hat=f_hat,
            kv_bytes_history=c.history_nbytes,
            kv_bytes_peak=c.peak_nbytes,
            kv_bytes_reference=c.layout.reference_bytes(),
            seconds=time.perf_counter() - self.start,
            compress_seconds=c.compress_seconds,
            policy=c.name,
            budget=c.budget,
            average_capacity=float(plan.average_capacity if plan is not None else c.layout.scales[-1].start),
            logits=logits,
        )


def check_sampling(cfg: float, top_k: int, top_p: float) -> None:
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg={cfg!r}: expected a finite guidance scale >= 0")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: expected an integer >= 0 (0 disables top-k)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: expected a number in [0, 1] (0 disables top-p)")


def make_generator(seed, device: torch.device) -> torch.Generator:
    """The sampling generator for ``seed`` (None means 0) on ``device``; a seed must be an integer in [0, 2**63)."""
    seed = 0 if seed is None else check_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def make_generators(seed, batch: int, device: torch.device, seeding: str = "image"):
    """The sampling generators of a batch of ``batch`` images on ``device`` (see :func:`scalekv.checks.check_seeds`):
    under ``seeding="image"`` a list with one generator per image (image ``i`` of seed ``s`` is seeded ``s + i``, or
    with ``seed[i]`` for a list), so an image never depends on its batch; under ``seeding="batch"`` one generator
    for the whole batch, as the official implementations."""
    seeds = check_seeds(seed, batch, seeding=seeding)
    if seeding == "batch":
        return make_generator(seeds[0], device)
    return [make_generator(s, device) for s in seeds]
