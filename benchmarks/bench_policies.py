"""KV memory and time of every cache policy at several budgets, measured in one run against the full cache.

Random weights (memory and time do not depend on them). For each policy and budget it prints

* history and peak: ``kv_history_ratio`` and ``kv_peak_ratio`` (scalekv.generation), over the reference full cache;
* time / full: time of a whole generation (transformer, sampling, VQVAE decode) over the full cache's, each the
  fastest of ``--repeat`` runs, interleaved so that drifts in machine load hit every row alike;
* compress share: the seconds the cache spent compressing (scoring, selection, gather) over that generation's time;
* codec share (``--kv-bits 16,8,4``: every row at every bit width): the seconds the quantised store spent quantising
  what a layer keeps and dequantising its history for the attention, over that generation's time (the quantising
  of a compressing policy's kept tokens is inside its compress share too).

    .venv/bin/python benchmarks/bench_policies.py --depth 8 --vae-ch 32 --threads 1 --clock cpu --repeat 1

On a shared host, ``--threads 1 --clock cpu`` measures this process's CPU seconds, which other processes' load
does not inflate as it does wall time; on a dedicated machine or GPU use the default wall clock.

ScaleKV runs with the SPEC §4 rule plan for the drafters given by ``--drafters``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from scalekv.cache import POLICIES, KVCache, make_cache
from scalekv.cache.quant_store import QuantizedKVStore, check_kv_bits
from scalekv.cache.store import ConcatStore
from scalekv.models import VARConfig, VQVAEConfig
from scalekv.pipeline import random_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infinity import uncalibrated  # noqa: E402

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=8, help="VAR depth; width 64*depth and depth heads, as the presets")
    p.add_argument("--patch-nums", default=",".join(map(str, PN_256)), help="square schedule sides, e.g. 1,2,4,...")
    p.add_argument("--batch", type=int, default=1, help="images per generation (the cache holds twice as many rows)")
    p.add_argument("--budgets", default="0.04,0.1,0.2")
    p.add_argument("--policies", default=",".join(sorted(set(POLICIES) - {"full"})))
    p.add_argument("--drafters", default="0", help="ScaleKV drafter layers (rule plan)")
    p.add_argument("--kv-bits", default="16", help="stored K/V bit widths crossed with every row, e.g. 16,8,4")
    p.add_argument("--vae-ch", type=int, default=64, help="VQVAE width (decode cost only; the official is 160)")
    p.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest counts")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (shared hosts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p.parse_args(argv)


def build_pipeline(args: argparse.Namespace):
    sides = tuple(int(s) for s in args.patch_nums.split(","))
    var_cfg = VARConfig.official(args.depth, patch_nums=sides)
    vae_cfg = VQVAEConfig(ch=args.vae_ch, patch_nums=sides, with_encoder=False)
    pipe = random_pipeline(var_cfg, vae_cfg, seed=0)
    return pipe.to(args.device, getattr(torch, args.dtype))


def measure(pipe, labels: list[int], cache: KVCache, clock) -> dict:
    """One generation with ``cache``: its time and compression time (both by ``clock``) and KV bytes."""
    cache.clock = clock
    QuantizedKVStore.clock = staticmethod(clock)
    start = clock()
    gen = pipe.generate(labels, cache=cache, seed=0)
    return {
        "seconds": clock() - start,
        "compress": cache.compress_seconds,
        "codec": getattr(cache.store, "codec_seconds", 0.0),
        "history": gen.kv_history_ratio,
        "peak": gen.kv_peak_ratio,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}: expected some of {sorted(POLICIES)}")
    drafters = [int(d) for d in args.drafters.split(",") if d]
    bit_widths = [check_kv_bits(int(q)) for q in args.kv_bits.split(",") if q]
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall on an accelerator")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    pipe = build_pipeline(args)
    labels = list(range(args.batch))
    cfg = pipe.model.cfg
    pipe.generate(labels, seed=0)  # warm-up

    def maker(name: str, budget: float, bits: int):
        extra = {"drafters": drafters} if name == "scalekv" else uncalibrated(name, cfg.depth, cfg.num_heads)
        if name != "full":
            extra["budget"] = budget
        return lambda: make_cache(name, kv_bits=bits, **extra)

    def label(name: str, bits: int) -> str:
        return name if bits == 16 else f"{name} {bits}-bit"

    # the full cache on the textbook concatenating store: what writing in place costs or saves
    textbook = ("full (torch.cat store)", 1.0, lambda: KVCache().configure(store=ConcatStore))
    rows = [("full", 1.0, KVCache), textbook]
    rows += [(label("full", q), 1.0, maker("full", 1.0, q)) for q in bit_widths if q != 16]
    rows += [(label(n, q), b, maker(n, b, q)) for b in budgets for n in policies for q in bit_widths]
    results: dict[tuple[str, float], dict] = {}
    for _ in range(args.repeat):  # interleave the repeats over all rows
        for name, budget, make in rows:
            run = measure(pipe, labels, make(), clock)
            best = results.get((name, budget))
            if best is None or run["seconds"] < best["seconds"]:
                results[(name, budget)] = run
    full = results[("full", 1.0)]

    tokens = cfg.seq_len
    print(
        f"VAR depth {cfg.depth} (width {cfg.embed_dim}, {cfg.num_heads} heads), random weights, {args.dtype}, "
        f"schedule {'/'.join(map(str, cfg.patch_nums))} ({tokens} tokens), batch {args.batch} (x2 CFG rows), "
        f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"{args.clock} clock, fastest of {args.repeat}; "
        f"full cache: {full['seconds']:.2f} s"
    )
    print()
    print("| policy | budget | kv_history_ratio | kv_peak_ratio | time / full | compress share | codec share |")
    print("|---|---|---|---|---|---|---|")
    for name, budget, _ in rows:
        r = results[(name, budget)]
        print(
            f"| {name} | {budget:g} | {r['history']:.3f} | {r['peak']:.3f} | "
            f"{r['seconds'] / full['seconds']:.2f} | {100 * r['compress'] / r['seconds']:.1f}% | "
            f"{100 * r['codec'] / r['seconds']:.1f}% |"
        )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)")
