"""Attention over heads of different lengths: the per-head store's alternatives, timed on the same tensors.

For each length pattern (one layer, Infinity-2B-like heads: 16 heads of 64 channels, 2 rows, one 32x32 map of
queries), prints the time of every mode of :func:`scalekv.cache.head_store.ragged_attention` over the time of one
dense SDPA over heads that all hold the mean length (the same tokens, unpadded), fastest of ``--repeat``, fp32:
``auto`` (one SDPA over all heads when they agree, else one per head), ``group`` (one SDPA per set of equal-length
heads, stacked), ``loop`` (one per head), ``pad`` (one SDPA over heads padded to the longest, masked) and ``flex``
(FlexAttention over the packed heads; CUDA only by default: uncompiled on CPU it is two orders slower).

    .venv/bin/python benchmarks/bench_ragged.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from scalekv.cache.head_store import ATTENTION_MODES, ragged_attention


def patterns(heads: int) -> dict[str, list[int]]:
    mean = 650
    return {
        "uniform (one length)": [mean] * heads,
        "HACK-like (two lengths)": [260 if h % 2 == 0 else 1040 for h in range(heads)],
        "HeatKV-like (every head its own)": [int(100 + 1100 * h / (heads - 1)) for h in range(heads)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--modes", help="comma-separated subset (default: all; flex only on CUDA, eager flex is unusable on CPU)"
    )
    args = p.parse_args(argv)
    modes = args.modes.split(",") if args.modes else [m for m in ATTENTION_MODES if m != "flex" or args.device != "cpu"]
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t)
        return best

    q = torch.randn(args.rows, args.heads, args.queries, args.head_dim, device=dev, generator=g)
    print(
        f"# {args.heads} heads x {args.head_dim}, {args.rows} rows, {args.queries} queries, {dev}, "
        f"{args.threads} thread(s), torch {torch.__version__}"
    )
    print("| lengths | dense (ms) | " + " | ".join(f"{m} / dense" for m in modes) + " |")
    print("|---" * (2 + len(modes)) + "|")
    for label, lengths in patterns(args.heads).items():
        ks = [torch.randn(args.rows, 1, n, args.head_dim, device=dev, generator=g) for n in lengths]
        vs = [torch.randn_like(k) for k in ks]
        mean = round(sum(lengths) / len(lengths))
        kd = torch.randn(args.rows, args.heads, mean, args.head_dim, device=dev, generator=g)
        dense = timed(lambda kd=kd: torch.nn.functional.scaled_dot_product_attention(q, kd, kd))
        cells = []
        for mode in modes:
            try:
                ragged_attention(q, ks, vs, 1.0, mode)
            except Exception as e:  # noqa: BLE001  (a mode the platform cannot run is reported, not hidden)
                cells.append(f"n/a ({type(e).__name__})")
                continue
            cells.append(f"{timed(lambda m=mode, ks=ks, vs=vs: ragged_attention(q, ks, vs, 1.0, m)) / dense:.2f}")
        print(f"| {label} | {dense * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
