"""``scalekv generate``: images for class labels, with any cache policy, plus stats.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images and write PNGs + stats.json")
    p.add_argument("--model", required=True, help="model name, e.g. var-d16 or demo")
    p.add_argument("--weights", help="folder with the model's checkpoint files")
    p.add_argument("--labels", required=True, help="comma-separated class ids, e.g. 207,360")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--policy", default="full", help="cache policy name (see `scalekv plan` / README)")
    p.add_argument("--budget", type=float, default=None, help="KV budget fraction in (0, 1]")
    p.add_argument("--plan", help="ScaleKV plan JSON (for --policy scalekv)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.set_defaults(run=run)


def parse_labels(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected comma-separated integers such as 207,360") from None


def cache_from_args(args: argparse.Namespace):
    from ..cache import make_cache

    kwargs = {}
    if args.budget is not None:
        kwargs["budget"] = args.budget
    if args.plan:
        kwargs["plan"] = args.plan
    return make_cache(args.policy, **kwargs)


def save_images(images: torch.Tensor, out: Path, prefix: str = "") -> list[Path]:
    """Write (B, 3, H, W) images in [0, 1] as PNGs; returns the paths."""
    paths = []
    arr = (images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    for i, a in enumerate(arr):
        path = out / f"{prefix}{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(a)).save(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from ..hub import load_pipeline

    labels = parse_labels(args.labels)
    cache = cache_from_args(args)
    pipe = load_pipeline(args.model, args.weights).to(args.device)
    gen = pipe.generate(
        labels, cache=cache, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed, greedy=args.greedy
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = save_images(gen.images, out)
    retained = gen.scales[-1].kv_bytes
    stats = {
        "model": args.model,
        "policy": args.policy,
        "budget": args.budget,
        "labels": labels,
        "seed": args.seed,
        "images": [p.name for p in paths],
        "kv_bytes_retained": retained,
        "kv_bytes_full": gen.kv_bytes_full,
        "kv_bytes_peak": gen.kv_bytes_peak,
        "kv_retained_ratio": retained / gen.kv_bytes_full,
        "seconds": gen.seconds,
        "cache_lengths_per_scale": [s.cache_lengths for s in gen.scales],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(f"wrote {len(paths)} images and stats.json to {out} ({gen.seconds:.2f} s, "
          f"KV {retained / 2**20:.2f} MiB of {gen.kv_bytes_full / 2**20:.2f} MiB full)")
    return 0
