"""ASI calibration ablations on the demo model: PSNR and SSIM against the full cache at one budget.

Every row generates the same ``--n`` images (labels cycling over the classes, seed ``--seed``, the demo model's
sampling) with one cache and compares them with the full-cache images of the same run. Calibration statistics come
from ``--samples`` other images (seed ``--calib-seed``), never the evaluation ones. One factor changes per block,
everything else stays at the base setting (the shipped defaults):

* reference: every registered baseline at the budget, with its own defaults;
* ASI: sum, product, top-K only, current only, and the base drafters with uniform capacities;
* delta: the refiners' linear decay (start and end as fractions of B; the paper's 2B setting is 0.923 -> 0.492);
* N_d: the number of drafters;
* samples: calibration images, 1 .. 64;
* selection: pooling avg vs max, kernel, observation grid; spec: SPEC §5's grid 4, kernel 5, avg together;
* split: does the drafter/refiner split matter? The calibrated plan, the same drafters with uniform capacities, and
  N_d from 0 (every layer a refiner, capacities by the refiner schedule) up to a third of the compressed pairs.

``--plan FILE`` (a plan ``scalekv calibrate`` made, e.g. one the demo model ships) replaces the base setting by that
plan's: its selection, ASI combination, N_d, refiner schedule, calibration images and seed, so that the base row is
the shipped plan itself and every other row changes one factor of it.

    .venv/bin/python benchmarks/calibration_ablation.py --n 100 --budget 0.1 --out docs/calibration/ablation_10pct.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scalekv.atomic import atomic_write_text
from scalekv.cache import POLICIES, make_cache
from scalekv.cache.settings import SELECTION_KEYS
from scalekv.calibration.calibrate import bound_generate, collect_stats, default_inputs, plan_from_stats
from scalekv.hub import default_sampling, load_pipeline
from scalekv.metrics import psnr, ssim

BASE = {
    "combine": "product",
    "num_drafters": None,  # the default rule: max(compressed scales, 7% of the compressed pairs)
    "refiner_start": 1.0,
    "refiner_end": 0.8,
    "samples": 16,
    "grid": 2,
    "kernel": 1,
    "pooling": "avg",
}


SPLIT_DRAFTERS = (0, 1, 2, 4, 8, 16, 32)  # cut to the compressed pairs the budget has


def base_from_plan(path: str, budget: float) -> dict:
    """The base setting of ``path``, a plan ``scalekv calibrate`` made at ``budget``."""
    from scalekv.cache.plan import load_plan

    plan = load_plan(path, budget)
    prov = plan.provenance or {}
    if prov.get("rule") != "scalekv-asi":
        raise SystemExit(f"--plan {path}: expected a plan made by scalekv calibrate (rule scalekv-asi)")
    sel = dict(plan.selection or {})
    return {
        "combine": prov["combine"],
        "num_drafters": prov["num_drafters"],
        "refiner_start": prov["refiner_start"],
        "refiner_end": prov["refiner_end"],
        "samples": prov["statistics"]["samples"],
        "calib_seed": prov["seed"],
        **sel,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--n", type=int, default=100, help="evaluation images (labels cycle over the classes)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument("--calib-seed", type=int, default=1000, help="calibration seed (differs from --seed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", default="reference,asi,delta,drafters,samples,selection")
    p.add_argument("--plan", help="take the base setting from this calibrated plan (its budget must be --budget)")
    p.add_argument("--out", help="write the markdown table here (and a .json next to it)")
    return p.parse_args(argv)


def settings(block: str) -> list[tuple[str, dict]]:
    """(label, overrides of BASE) for one ablation block."""
    if block == "asi":
        rows = [(f"ASI {c}", {"combine": c}) for c in ("sum", "product", "topk", "current")]
        return rows + [("base drafters, uniform capacities", {"uniform": True})]
    if block == "delta":
        pairs = [(1.0, 1.0), (1.0, 0.9), (1.0, 0.8), (1.0, 0.6), (0.923, 0.492)]
        return [(f"refiners {s:g} -> {e:g} of B", {"refiner_start": s, "refiner_end": e}) for s, e in pairs]
    if block == "drafters":
        return [(f"N_d = {n}", {"num_drafters": n}) for n in (0, 1, 2, 3, 4, 5, 8, 12)]
    if block == "samples":
        return [(f"{n} calibration images", {"samples": n}) for n in (1, 2, 4, 8, 16, 32, 64)]
    if block == "selection":
        rows = [(f"pooling {p}, kernel {k}", {"pooling": p, "kernel": k}) for k in (3, 5) for p in ("avg", "max")]
        rows.append(("no pooling (kernel 1)", {"kernel": 1}))
        return rows + [(f"grid {g}x{g}", {"grid": g}) for g in (1, 2, 3, 4)]
    if block == "split":
        rows = [("calibrated plan", {}), ("same drafters, uniform capacities", {"uniform": True})]
        return rows + [(f"N_d = {n}", {"num_drafters": n}) for n in SPLIT_DRAFTERS]
    if block == "spec":  # the calibrated plan with SPEC §5's selection instead of the measured one
        return [("SPEC §5 selection: grid 4, kernel 5, avg", {"grid": 4, "kernel": 5, "pooling": "avg"})]
    raise ValueError(f"unknown block {block!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_from_plan(args.plan, args.budget) if args.plan else dict(BASE)
    calib_seed = base.pop("calib_seed", args.calib_seed)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo")
    sampling = default_sampling("demo")
    labels = default_inputs(pipe.model.cfg.num_classes, args.n)
    ref = pipe.generate(labels, seed=args.seed, **sampling).images

    def fidelity(cache) -> tuple[float, float]:
        images = pipe.generate(labels, cache=cache, seed=args.seed, **sampling).images
        return psnr(images, ref).mean().item(), ssim(images, ref).mean().item()

    stats_by_samples: dict[int, object] = {}

    def stats(samples: int):
        if samples not in stats_by_samples:
            inputs = default_inputs(pipe.model.cfg.num_classes, samples)
            generate = bound_generate(pipe.generate, sampling)
            stats_by_samples[samples] = collect_stats(generate, inputs, budget=args.budget, seed=calib_seed)
        return stats_by_samples[samples]

    results = []
    start = time.perf_counter()
    for block in args.blocks.split(","):
        if block == "reference":
            for name in POLICIES:
                if name not in ("full", "scalekv"):
                    p, s = fidelity(make_cache(name, budget=args.budget))
                    results.append({"block": block, "setting": name, "psnr": p, "ssim": s})
                    print(f"{block:10s} {name:40s} PSNR {p:6.2f} SSIM {s:.4f}", flush=True)
            continue
        for label, overrides in settings(block):
            cfg = {**base, **overrides}
            try:
                plan = plan_from_stats(
                    stats(cfg["samples"]),
                    args.budget,
                    combine=cfg["combine"],
                    num_drafters=cfg["num_drafters"],
                    uniform=cfg.get("uniform", False),
                    refiner_start=cfg["refiner_start"],
                    refiner_end=cfg["refiner_end"],
                )
            except ValueError as e:  # e.g. so many drafters that a scale has no refiner left: reported, not run
                results.append(
                    {"block": block, "setting": label, "psnr": float("nan"), "ssim": float("nan"), "error": str(e)}
                )
                print(f"{block:10s} {label:40s} not possible: {e}", flush=True)
                continue
            cache = make_cache("scalekv", plan=plan, **{k: cfg[k] for k in SELECTION_KEYS if k in cfg})
            p, s = fidelity(cache)
            drafters = {k: list(d) for k, d in enumerate(plan.drafters) if d}
            results.append({"block": block, "setting": label, "psnr": p, "ssim": s, "drafters": drafters})
            print(f"{block:10s} {label:40s} PSNR {p:6.2f} SSIM {s:.4f} drafters {drafters}", flush=True)
    print(f"{len(results)} settings in {time.perf_counter() - start:.0f} s")

    lines = [
        f"Budget {args.budget:g}, {args.n} images (seed {args.seed}) vs the full cache; calibration seed "
        f"{calib_seed}. Base{' (from ' + args.plan + ')' if args.plan else ''}: {json.dumps(base)}.",
        "",
        "| block | setting | PSNR (dB) | SSIM | drafters (scale: layers) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        drafters = ", ".join(f"{k}: {v}" for k, v in r.get("drafters", {}).items()) or "—"
        if "error" in r:
            lines.append(f"| {r['block']} | {r['setting']} | not possible: {r['error']} | | |")
            continue
        lines.append(f"| {r['block']} | {r['setting']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {drafters} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
        atomic_write_text(
            out.with_suffix(".json"), json.dumps({"base": base, "args": vars(args), "rows": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
