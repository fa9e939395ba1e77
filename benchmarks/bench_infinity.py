"""Every cache policy on Infinity at 1024x1024: a reduced-width model with Infinity-2B's 32 layers.

Runs the real generation loop (text pool, CFG on logits, bit sampling, trilinear next-scale inputs, BSQ decode) on
the 13-scale 1M schedule (10,521 tokens; the last scale attends over a 6,425-token prefix) with random weights and
random text features; weights do not matter for memory. Per policy it prints, from one run:

* the history it keeps: KV bytes held after the second-to-last scale (what the 64x64 scale attends over besides
  its own map), checked against SPEC §4's accounting ``2 x layers x rows x tokens x channels x bytes``, and the same
  token counts priced at Infinity-2B's width (2048 channels, bf16);
* the peak KV bytes (``kv_bytes_peak``, the store's allocation) and ``kv_peak_ratio``, over the reference full cache;
* wall time and the share spent compressing.

ScaleKV runs the released 10% plan for Infinity-2B (``--plan``); the other policies run ``--budget`` (default 0.1).
Usage: ``python benchmarks/bench_infinity.py [--pixels 1M] [--policies a,b] [--plan FILE] [--threads N]``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

from scalekv.cache import POLICIES, make_cache
from scalekv.cache.plan import PLANS_DIR
from scalekv.infinity_pipeline import random_infinity_pipeline
from scalekv.models.bsq_vae import BSQVAEConfig
from scalekv.models.infinity import InfinityConfig, TextBatch
from scalekv.schedules import get_schedule

ROOT = Path(__file__).resolve().parents[1]
RELEASED_2B = PLANS_DIR / "infinity_2b_10pct.json"  # the released file, shipped in the package
WIDTH_2B, BF16 = 2048, 2


def bench_config() -> tuple[InfinityConfig, BSQVAEConfig]:
    """32 layers (Infinity-2B's depth and chunking, 32-bit codes); 32 channels instead of 2048."""
    cfg = InfinityConfig(
        depth=32,
        embed_dim=32,
        num_heads=2,
        mlp_ratio=8.0,
        text_channels=128,
        text_maxlen=64,
        block_chunks=8,
        d_vae=32,
        cross_attn_bf16=True,
    )
    vae = BSQVAEConfig(codebook_dim=32, base_ch=8, groups=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    return cfg, vae


def uncalibrated(name: str, depth: int, heads: int) -> dict:
    """What a head-aware policy takes on random weights, which have no statistics worth calibrating: HACK with every
    other head contextual, AMS-KV with the first half of the layers demanding, HeatKV with random removal orders
    (memory and time depend on the counts, not on which heads)."""
    if name == "hack":
        return {"contextual": [[layer, h] for layer in range(depth) for h in range(0, heads, 2)]}
    if name == "ams_kv":
        return {"demanding": list(range(max(1, depth // 2)))}
    if name == "heatkv":
        return {"seed": 0}
    return {}


def policy_cache(name: str, budget: float, plan: Path | None, depth: int, heads: int = 2):
    params = inspect.signature(POLICIES[name]).parameters
    if uncalibrated(name, depth, heads):
        return make_cache(name, budget=budget, **uncalibrated(name, depth, heads))
    if name == "full":
        return make_cache(name)
    if "plan" in params and plan is not None:
        return make_cache(name, plan=str(plan))
    if "drafters" in params:  # no plan file: the SPEC rule with the released 2B drafters
        return make_cache(name, budget=budget, drafters=[0, 23 if depth == 32 else depth - 1])
    return make_cache(name, budget=budget)


def capacities_kept(gen, cache, schedule) -> bool:
    """After every scale but the last, every layer holds exactly min(its capacity, what it attended over)."""
    before = [0] * len(gen.scales[0].cache_lengths)
    for rec, scale in zip(gen.scales[:-1], schedule.scales[:-1], strict=True):
        for layer, length in enumerate(rec.cache_lengths):
            cap = cache.capacity(layer, scale)
            held = before[layer] + scale.length
            if length != (held if cap is None else min(cap, held)):
                return False
        before = rec.cache_lengths
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixels", default="1M", help="pixel count of the 1:1 schedule (1M = 1024x1024)")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--plan", type=Path, help="ScaleKV plan (default at 1M: the released 2B 10%% file)")
    p.add_argument("--policies", help="comma-separated subset (default: every registered policy)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.policies.split(",") if args.policies else sorted(POLICIES, key=lambda n: (n != "full", n))
    cfg, vae_cfg = bench_config()
    schedule = get_schedule(1.0, args.pixels)
    if args.plan is None and args.pixels == "1M" and RELEASED_2B.is_file():
        args.plan = RELEASED_2B
    pipe = random_infinity_pipeline(cfg, vae_cfg, seed=0)
    text = TextBatch(torch.randn(12, cfg.text_channels, generator=torch.Generator().manual_seed(0)), torch.tensor([12]))
    rows, elem, channels = 2, pipe.model.pos_start.element_size(), cfg.embed_dim
    prefix = schedule.scales[-1].start
    print(
        f"# Infinity, {cfg.depth} layers x {channels} channels, {schedule.image_size[1]}x{schedule.image_size[0]} "
        f"({len(schedule.sizes)} scales, {schedule.total_tokens} tokens, prefix {prefix}), batch 1 + CFG, "
        f"float32 on {torch.get_num_threads()} CPU threads; torch {torch.__version__}"
    )
    print(
        "| policy | history tokens/layer | history KV | SPEC §4 check | capacities kept | at 2B width, bf16 "
        "| of full prefix | peak KV | peak / full | seconds | compress s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    full_seconds = None
    for name in names:
        cache = policy_cache(name, args.budget, args.plan, cfg.depth)
        start = time.perf_counter()
        gen = pipe.generate(text, schedule=schedule, cache=cache, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=0)
        seconds = time.perf_counter() - start
        full_seconds = seconds if name == "full" else full_seconds
        history = gen.scales[-2]
        tokens = sum(history.cache_lengths)
        spec = 2 * rows * tokens * channels * elem  # K and V, every row, every held token of every layer
        ok = "ok" if spec == history.kv_bytes else f"MISMATCH ({history.kv_bytes})"
        kept = "yes" if capacities_kept(gen, cache, schedule) else "NO"
        at_2b = 2 * rows * tokens * WIDTH_2B * BF16
        full_prefix = 2 * cfg.depth * rows * prefix * channels * elem
        print(
            f"| {name} | {tokens / cfg.depth:.1f} | {history.kv_bytes / 2**20:.2f} MiB | {ok} | {kept} | "
            f"{at_2b / 1e9:.3f} GB | {history.kv_bytes / full_prefix:.3f} | {gen.kv_bytes_peak / 2**20:.2f} MiB | "
            f"{gen.kv_peak_ratio:.3f} | {seconds:.1f}"
            f"{f' ({seconds / full_seconds:.2f}x)' if full_seconds and name != 'full' else ''} | "
            f"{getattr(cache, 'compress_seconds', 0.0):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
