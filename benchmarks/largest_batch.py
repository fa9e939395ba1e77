"""Largest batch under a memory limit (SPEC §7): computed for the real layouts, measured for a narrow model.

Computed, per model and policy: memory = weights + batch x (KV peak per image + activations per image), bf16
(2 bytes per element), batch rows doubled by CFG. The pieces:

* weights: the model's parameters counted on the meta device from its config (the transformer; for Infinity also
  the flan-t5-xl encoder, 1.22 B parameters, and the VAE; for VAR the VQVAE), in bf16;
* KV peak per image: ``kv_bytes_peak`` of the cache for that model's schedule (the store's allocation, made from the
  plan), at the real width and heads, for one image (2 rows with CFG);
* activations per image (an estimate, stated here): at the peak moment the last scale's tokens pass one block, which
  holds about 14 vectors of C per token (residual, normalised input, q/k/v, normalised q and k, attention output,
  the MLP's 4C hidden twice) plus the float32 logits of the last scale (VAR: vocabulary 4096; Infinity: 2 per bit).

ScaleKV runs the released 10% plan on Infinity 1024² and the SPEC §4 rule with drafter layer 0 on VAR (no plan was
released for VAR); the other policies run their budget. Measured (``--measure``): images/s of the demo model at the
largest batch whose computed memory fits ``--cap`` MiB, full cache vs a 10% policy, in one run, float32 on CPU.
Usage: ``python benchmarks/largest_batch.py [--limits 24,48,80] [--policies full,scalekv,snapkv] [--measure]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

T5_XL_ENCODER_PARAMS = 1_221_000_000  # flan-t5-xl encoder (d_model 2048, 24 layers): ~1.22 B parameters
BF16 = 2


def count_params(module_fn) -> int:
    with torch.device("meta"):
        module = module_fn()
    return sum(p.numel() for p in module.parameters())


def models():
    """(name, layout for one image with CFG, weight bytes, activation bytes per image) for the real models."""
    from scalekv.cache import CacheLayout
    from scalekv.models.bsq_vae import BSQ_VAE_PRESETS, BSQVAE
    from scalekv.models.infinity import INFINITY_PRESETS, Infinity
    from scalekv.models.var import VAR, VAR_PRESETS
    from scalekv.models.vqvae import VQVAE, VQVAE_PRESETS
    from scalekv.schedules import get_schedule

    out = []
    for name, cfg in VAR_PRESETS.items():
        vae = VQVAE_PRESETS["vae_ch160v4096z32" if cfg.patch_nums[-1] == 16 else "vae_ch160v4096z32_512"]
        params = count_params(lambda cfg=cfg: VAR(cfg)) + count_params(lambda vae=vae: VQVAE(vae))
        layout = CacheLayout(cfg.depth, cfg.num_heads, cfg.head_dim, cfg.scales, 2, 1, dtype=torch.bfloat16)
        last = cfg.scales[-1].length
        act = 2 * last * (14 * cfg.embed_dim * BF16 + cfg.vocab_size * 4)
        out.append((name, layout, params * BF16, act))
    schedule = get_schedule(1.0, "1M")
    vaes = {"infinity-2b": "infinity_vae_d32reg", "infinity-8b": "infinity_vae_d56_f8_14_patchify"}
    for name, cfg in INFINITY_PRESETS.items():
        vae = BSQ_VAE_PRESETS[vaes[name]]
        params = count_params(lambda cfg=cfg: Infinity(cfg, init_weights=False)) + count_params(lambda v=vae: BSQVAE(v))
        params += T5_XL_ENCODER_PARAMS
        layout = CacheLayout(cfg.depth, cfg.num_heads, cfg.head_dim, schedule.scales, 2, 1, dtype=torch.bfloat16)
        last = schedule.scales[-1].length
        act = 2 * last * (14 * cfg.embed_dim * BF16 + 2 * cfg.d_vae * 4)
        out.append((name, layout, params * BF16, act))
    return out


def policy_cache(model: str, name: str, budget: float):
    from scalekv.cache import make_cache
    from scalekv.cache.plan import PLANS_DIR

    if name == "full":
        return make_cache("full")
    if name == "scalekv":
        released = {"infinity-2b": "infinity_2b_10pct.json", "infinity-8b": "infinity_8b_10pct.json"}
        if model in released and budget == 0.1:
            return make_cache("scalekv", plan=str(PLANS_DIR / released[model]))
        return make_cache("scalekv", budget=budget, drafters=[0])
    return make_cache(name, budget=budget)


def kv_peak(layout, cache) -> int:
    """The cache's peak KV bytes for ``layout``, computed by sizing its store on the meta device."""
    import dataclasses

    cache.reset(dataclasses.replace(layout, device=torch.device("meta")))
    return cache.peak_nbytes


def table(limits_gb: list[float], policies: list[str], budget: float) -> str:
    lines = [
        "| model | weights (bf16) | policy | KV peak / image | activations / image | "
        + " | ".join(f"batch in {g:g} GB" for g in limits_gb)
        + " |",
        "|---" * (5 + len(limits_gb)) + "|",
    ]
    for name, layout, weights, act in models():
        for pol in policies:
            kv = kv_peak(layout, policy_cache(name, pol, budget))
            fits = [max(0, int((g * 1e9 - weights) // (kv + act))) for g in limits_gb]
            label = pol if pol == "full" else f"{pol} {budget:.0%}"
            lines.append(
                f"| {name} | {weights / 1e9:.2f} GB | {label} | {kv / 1e9:.3f} GB | {act / 1e9:.3f} GB | "
                + " | ".join(str(f) for f in fits)
                + " |"
            )
    return "\n".join(lines)


def measure(cap_mib: float, policy: str, budget: float, threads: int) -> str:
    """images/s of the demo model at the largest batch that fits ``cap_mib`` (computed), full vs ``policy``."""
    from scalekv.cache import make_cache
    from scalekv.hub import default_sampling, load_pipeline, policy_defaults

    torch.set_num_threads(threads)
    pipe = load_pipeline("demo")
    sampling = default_sampling("demo")
    cfg = pipe.model.cfg
    weights = sum(p.numel() * p.element_size() for p in pipe.model.parameters())
    weights += sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    act = 2 * cfg.scales[-1].length * (14 * cfg.embed_dim + cfg.vocab_size) * 4  # float32
    lines = [
        f"demo model, float32, {threads} thread(s); cap {cap_mib:g} MiB = weights {weights / 2**20:.1f} MiB "
        f"+ batch x (KV peak + activations {act / 2**20:.2f} MiB per image)",
        "| cache | KV peak / image | largest batch | seconds | images/s |",
        "|---|---|---|---|---|",
    ]
    pipe.generate([0, 1], seed=0, **sampling)  # warm-up
    for name in ("full", policy):
        options = {} if name == "full" else {"budget": budget, **policy_defaults("demo", name, budget, None)}
        probe = make_cache(name, **options)
        probe.reset(pipe.model.cache_layout(rows=2, cond_rows=1))
        per_image = probe.peak_nbytes + act
        batch = int((cap_mib * 2**20 - weights) // per_image)
        labels = [i % cfg.num_classes for i in range(batch)]
        start = time.perf_counter()
        pipe.generate(labels, cache=make_cache(name, **options), seed=0, **sampling)
        seconds = time.perf_counter() - start
        label = name if name == "full" else f"{name} {budget:.0%}"
        lines.append(
            f"| {label} | {probe.peak_nbytes / 2**20:.3f} MiB | {batch} | {seconds:.1f} | {batch / seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limits", default="24,48,80", help="memory limits in GB (comma-separated)")
    p.add_argument("--policies", default="full,scalekv,snapkv,h2o,pyramidkv,streaming_llm,sliding_window")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--measure", action="store_true", help="also time the demo model at its largest batch")
    p.add_argument("--cap", type=float, default=64.0, help="CPU memory cap for --measure, MiB")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(table([float(x) for x in args.limits.split(",")], args.policies.split(","), args.budget))
    if args.measure:
        print()
        print(measure(args.cap, "snapkv", args.budget, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
