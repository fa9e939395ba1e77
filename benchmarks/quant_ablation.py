"""Quantised KV storage on the demo model: key grouping, group size and sink tokens, measured in one run.

For each policy and budget it generates the same ``--n`` images (image i: label i mod 10, seeded i, the model's own
sampling) with the full cache, the policy at 16 bits, and the policy under every storage setting below, and prints

* ``kv_history_ratio`` and ``kv_peak_ratio`` (scalekv.generation), over the reference full cache;
* PSNR vs 16 bits: mean per-image PSNR against the same policy's 16-bit images (the quantisation's own effect;
  100 dB for an identical image), and the share of identical images;
* PSNR vs full and its change from 16 bits: the issue's fidelity target (int8 within 0.1 dB, int4 within 0.5 dB).

    .venv/bin/python benchmarks/quant_ablation.py --n 96 --policies scalekv --budgets 0.1

``--memory`` prints instead where ScaleKV's quantised peak goes (docs/memory.md): the quantised buffers, the float
workspace, and the floor (the last scale's map of one layer, at full precision), with no generation.

Settings (``bits/keys/group/sinks``): per-token keys (``token``: groups of ``group`` channels along head_dim, as
values) or per-channel keys (``channel``: groups of ``group`` tokens per channel), and ``sinks`` tokens (the earliest
every row and head holds) stored one step finer.
"""

from __future__ import annotations

import argparse
import time

import torch

from scalekv.cache import make_cache
from scalekv.hub import default_plan, default_sampling, load_pipeline
from scalekv.metrics import psnr

# (kv_bits, kv_keys, kv_group, kv_sinks); the first row of each width is the default
SETTINGS = (
    (8, "token", 32, 1),
    (8, "token", 32, 0),
    (8, "channel", 32, 0),
    (4, "token", 32, 1),
    (4, "token", 32, 0),
    (4, "token", 16, 0),
    (4, "token", 64, 0),
    (4, "channel", 32, 0),
    (4, "channel", 16, 0),
    (4, "channel", 32, 1),
    (4, "token", 16, 1),
    (4, "token", 32, 4),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="images per row (default 96)")
    p.add_argument("--policies", default="scalekv", help="comma-separated (default scalekv)")
    p.add_argument("--budgets", default="0.1", help="comma-separated fractions (default 0.1)")
    p.add_argument(
        "--settings",
        help="bits/keys/group/sinks,... instead of the built-in list, e.g. 4/token/32/1,4/channel/32/4",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="print the memory breakdown of ScaleKV's quantised peak")
    return p.parse_args(argv)


def memory_table(pipe) -> None:
    """ScaleKV at 4/10/20% and 4 and 8 bits: what the quantised store allocates, over the reference full cache."""
    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    ref = layout.reference_bytes()
    floor = layout.scales[-1].length * layout.token_bytes  # one layer's last map, in the compute dtype
    print(
        "| ScaleKV budget | kv_bits | kv_history_ratio | kv_peak_ratio | quantised buffers | workspace | "
        "floor: last map | ideal: floor + history |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for budget, bits in ((0.04, 4), (0.1, 4), (0.2, 4), (0.1, 8)):
        cache = make_cache("scalekv", budget=budget, plan=default_plan("demo", budget), kv_bits=bits)
        cache.reset(layout)
        store = cache.store
        history = sum(store.bytes_for(n) for n in cache.held[-1])
        cells = [history, store.peak_bytes, store.allocated_bytes, store.workspace_bytes, floor, floor + history]
        print(f"| {100 * budget:g}% | {bits} | " + " | ".join(f"{c / ref:.4f}" for c in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo")
    if args.memory:
        memory_table(pipe)
        return
    sampling = default_sampling("demo")
    labels = [i % 10 for i in range(args.n)]

    def generate(policy: str, budget: float | None, **storage):
        kwargs = {} if budget is None else {"budget": budget}
        if policy == "scalekv":
            kwargs["plan"] = default_plan("demo", budget)
        return pipe.generate(labels, cache=make_cache(policy, **kwargs, **storage), seed=0, **sampling)

    settings = SETTINGS
    if args.settings:
        settings = []
        for text in args.settings.split(","):
            bits, keys, group, sinks = text.split("/")
            settings.append((int(bits), keys, int(group), int(sinks)))
    full = generate("full", None).images
    print(f"demo model, {args.n} images (image i: label i mod 10, seed i), float32, {args.threads} thread(s)")
    print()
    print(
        "| policy | budget | bits | keys | group | sinks | kv_history_ratio | kv_peak_ratio | PSNR vs 16 bits (dB) "
        "| identical | PSNR vs full (dB) | change from 16 bits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy in args.policies.split(","):
        for budget in [float(b) for b in args.budgets.split(",")] if policy != "full" else [None]:
            ref = generate(policy, budget)
            base = psnr(ref.images, full).mean().item()
            name = f"| {policy} | {'–' if budget is None else f'{100 * budget:g}%'} |"
            print(
                f"{name} 16 | – | – | – | {ref.kv_history_ratio:.4f} | {ref.kv_peak_ratio:.4f} | – | – | "
                f"{base:.2f} | – |",
                flush=True,
            )
            for bits, keys, group, sinks in settings:
                gen = generate(policy, budget, kv_bits=bits, kv_keys=keys, kv_group=group, kv_sinks=sinks)
                vs16 = psnr(gen.images, ref.images)
                vs_full = psnr(gen.images, full).mean().item()
                print(
                    f"{name} {bits} | {keys} | {group} | {sinks} | {gen.kv_history_ratio:.4f} | "
                    f"{gen.kv_peak_ratio:.4f} | {vs16.mean().item():.2f} | {(vs16 >= 100).float().mean().item():.2f} "
                    f"| {vs_full:.2f} | {vs_full - base:+.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)")
