"""One-GPU check of the cache at real size: Infinity-2B-shaped random weights, 1024x1024, bf16 autocast.

For the full cache, ScaleKV with the released 10% plan and SnapKV at 10% (in that order, same seed, same text
features), it prints seconds per image (after one warm-up generation, CUDA-synchronised), the computed
``kv_bytes_peak`` and ``kv_peak_ratio``, and ``torch.cuda.max_memory_allocated`` above the level before the
generation (weights excluded), measured up to the end of the last scale (before the decoder runs). Runs in a few
minutes on one recent GPU. Random weights: the images mean nothing; memory and time do not depend on weights.

Usage: ``python benchmarks/gpu_check.py [--batch 1] [--tiny]`` (``--tiny``: a 4-layer narrow model, for a smoke run
on any device, including CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from scalekv.cache import make_cache
from scalekv.cache.plan import PLANS_DIR
from scalekv.infinity_pipeline import random_infinity_pipeline
from scalekv.models.bsq_vae import BSQ_VAE_PRESETS, BSQVAEConfig
from scalekv.models.infinity import INFINITY_PRESETS, InfinityConfig, TextBatch
from scalekv.schedules import get_schedule


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="prompts per generation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 4-layer narrow model (smoke run)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per cache")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) has no CUDA device")
    if args.tiny:
        cfg = InfinityConfig(depth=4, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=16, block_chunks=2)
        vae_cfg = BSQVAEConfig(codebook_dim=32, base_ch=8, groups=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
        schedule = get_schedule(1.0, "0.06M")
        plan = None
    else:
        cfg, vae_cfg = INFINITY_PRESETS["infinity-2b"], BSQ_VAE_PRESETS["infinity_vae_d32reg"]
        schedule = get_schedule(1.0, "1M")
        plan = str(PLANS_DIR / "infinity_2b_10pct.json")
    pipe = random_infinity_pipeline(cfg, vae_cfg, seed=0).to(device)  # float32 weights, bf16 under autocast
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12] * args.batch)
    text = TextBatch(torch.randn(int(lengths.sum()), cfg.text_channels, generator=g).to(device), lengths.to(device))
    sampling = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=0)
    caches = {
        "full": lambda: make_cache("full"),
        "scalekv 10%": (lambda: make_cache("scalekv", plan=plan))
        if plan
        else lambda: make_cache("scalekv", budget=0.1, drafters=[0]),
        "snapkv 10%": lambda: make_cache("snapkv", budget=0.1),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(
        f"# Infinity {cfg.depth} layers x {cfg.embed_dim}, {schedule.total_tokens} tokens, batch {args.batch} + CFG, "
        f"{device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}"
    )
    print(
        "| cache | s / image | kv_bytes_peak | kv_peak_ratio | max_memory_allocated above start | measured / computed |"
    )
    print("|---|---|---|---|---|---|")
    with autocast:
        pipe.generate(text, schedule=schedule, cache=caches["full"](), **sampling)  # warm-up
        for label, build in caches.items():
            seconds, measured = [], None
            for _ in range(args.repeats):
                cache = build()
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    release = cache.release

                    def measured_release(release=release, base=base):
                        nonlocal measured
                        sync(device)
                        measured = torch.cuda.max_memory_allocated(device) - base
                        release()

                    cache.release = measured_release
                start = time.perf_counter()
                gen = pipe.generate(text, schedule=schedule, cache=cache, **sampling)
                sync(device)
                seconds.append(time.perf_counter() - start)
            per_image = min(seconds) / args.batch
            meas = "–" if measured is None else f"{measured / 2**30:.3f} GiB"
            ratio = "–" if measured is None else f"{measured / gen.kv_bytes_peak:.2f}"
            print(
                f"| {label} | {per_image:.2f} | {gen.kv_bytes_peak / 2**30:.3f} GiB | {gen.kv_peak_ratio:.3f} "
                f"| {meas} | {ratio} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
