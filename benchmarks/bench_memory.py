"""Peak KV memory, computed and measured, for every (policy, budget), each run in a fresh process.

Computed: the cache's ``kv_bytes_peak`` (scalekv.generation: the store's one allocation plus its copy scratch).
Measured, from the moment just before generation to the end of the last scale (before the decoder runs):

* CPU: torch's own allocation count, the CPU counterpart of CUDA's ``max_memory_allocated``: the generation runs
  under ``torch.profiler`` with ``profile_memory=True`` and the figure is the largest running total of the bytes
  torch has allocated (its ``[memory]`` events) above the total at the start, up to the end of the last scale. This
  is the headline figure (``allocated``): it counts live tensors exactly, whatever the C allocator does with freed
  blocks. Beside it, in separate runs without the profiler, the process's peak RSS above its level just before
  generation (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), once with glibc's
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live tensors more closely, once with the default allocator
  (freed blocks stay in the heap); RSS also counts heap fragmentation and varies by a few percent between runs;
* CUDA (``--device cuda``): ``max_memory_allocated`` and ``max_memory_reserved`` above their level before generation.

A generation also holds activations that no cache choice changes (the current scale's hidden states, q/k/v, the
MLP). They are measured, not estimated: the same model runs once with a cache that keeps one token per layer (the
``floor`` run), and every row's KV figure is ``measured - floor measured + floor computed``: the memory the cache
adds beyond a near-empty one. Both the raw delta and the floor-corrected figure are printed, with their ratios to
the computed peak.

Default model: Infinity's 13-scale 1024x1024 schedule (10,521 tokens) with Infinity-2B's 32 layers at 32 channels,
random weights (weights do not change memory); ``--model demo`` runs the shipped demo model on labels 0-9.
Usage: ``python benchmarks/bench_memory.py [--model infinity|demo] [--budgets 0.1] [--policies a,b] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scalekv.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# -- one run, in the child process -----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_setup(model: str):
    """``(generate(cache, small), cache_for(name, budget), scales)`` for the benchmark model."""
    if model == "demo":
        from scalekv.cache import make_cache
        from scalekv.hub import default_sampling, load_pipeline, policy_defaults

        pipe = load_pipeline("demo")
        sampling = default_sampling("demo")

        def generate(cache, small: bool = False):
            return pipe.generate([0, 1] if small else list(range(10)), cache=cache, seed=0, **sampling)

        def cache_for(name: str, budget: float | None):
            if budget is None:
                return make_cache(name)
            return make_cache(name, budget=budget, **policy_defaults("demo", name, budget, None))

        return generate, cache_for, pipe.model.cfg.scales
    sys.path.insert(0, str(HERE))
    from bench_infinity import RELEASED_2B, bench_config, policy_cache

    from scalekv.infinity_pipeline import random_infinity_pipeline
    from scalekv.models.infinity import TextBatch
    from scalekv.schedules import get_schedule

    cfg, vae_cfg = bench_config()
    pipe = random_infinity_pipeline(cfg, vae_cfg, seed=0)
    text = TextBatch(torch.randn(12, cfg.text_channels, generator=torch.Generator().manual_seed(0)), torch.tensor([12]))
    schedule, small = get_schedule(1.0, "1M"), get_schedule(1.0, "0.06M")
    sampling = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=0)

    def generate(cache, small_run: bool = False):
        return pipe.generate(text, schedule=small if small_run else schedule, cache=cache, **sampling)

    def cache_for(name: str, budget: float | None):
        plan = RELEASED_2B if name == "scalekv" and budget == 0.1 and RELEASED_2B.is_file() else None
        return policy_cache(name, budget if budget is not None else 1.0, plan, cfg.depth)

    return generate, cache_for, schedule.scales


def child(spec: dict) -> dict:
    """Run one generation and measure it; returns the row as a dict."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    generate, cache_for, scales = make_setup(spec["model"])
    if spec["policy"] == "floor":  # keeps one token per layer: what the model holds with a near-empty cache
        from scalekv.cache import make_cache

        cache = make_cache("sliding_window", budget=1 / scales[-1].start)
    else:
        cache = cache_for(spec["policy"], spec["budget"])
    generate(cache_for("full", None), True)  # warm-up on a small schedule: one-time allocations do not count
    gc.collect()
    measured = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc, base_res = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    elif not spec.get("profile"):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS")
    release = cache.release

    def measure_then_release():  # called by the generation loop after the last scale, before decoding
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            measured["allocated"] = torch.cuda.max_memory_allocated(device) - base_alloc
            measured["reserved"] = torch.cuda.max_memory_reserved(device) - base_res
        elif spec.get("profile"):
            with torch.profiler.record_function(END_MARK):
                pass
        else:
            measured["rss"] = (_status_kib("VmHWM") - base) * 1024
        release()

    cache.release = measure_then_release
    if spec.get("profile"):
        gen, measured["allocated"] = _profiled_peak(lambda: generate(cache))
    else:
        gen = generate(cache)
    return {"computed": gen.kv_bytes_peak, "reference": gen.kv_bytes_reference, **measured}


END_MARK = "scalekv_bench_last_scale_done"


def _profiled_peak(run):
    """``(run(), peak)``: ``run()`` under the profiler, and the largest running total of torch's CPU allocations
    (its ``[memory]`` events' ``Total Allocated``) above the total just before the first, up to the
    :data:`END_MARK` event."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    ends = [e["ts"] for e in events if e.get("name") == END_MARK]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    mem = [e for e in mem if ends and e["ts"] <= ends[0]]
    if not mem:
        raise RuntimeError("the profiler recorded no allocation before the end of the last scale")
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return result, max(e["args"]["Total Allocated"] for e in mem) - start


# -- the parent: one fresh process per run ---------------------------------------------------------------------
def run_child(spec: dict, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="infinity", choices=["infinity", "demo"])
    p.add_argument("--budgets", default="0.1", help="comma-separated budget fractions (default 0.1)")
    p.add_argument("--policies", help="comma-separated subset (default: every registered policy)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_out", help="also write the rows here as a JSON list")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from scalekv.cache import POLICIES, check_budget

    budgets = [check_budget(float(b)) for b in args.budgets.split(",")]
    names = args.policies.split(",") if args.policies else sorted(POLICIES)
    unknown = sorted(set(names) - set(POLICIES))
    if unknown:
        raise SystemExit(f"--policies {unknown}: expected registered policies {sorted(POLICIES)}")
    runs = [("full", None)] + [(n, b) for n in names if n != "full" for b in budgets]
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    # (label, environment, extra child settings, measured key); the first is the headline figure
    if cuda:
        settings = [("allocator", {}, {}, "allocated")]
    else:
        settings = [("allocated", {}, {"profile": True}, "allocated"), ("mmap", MMAP_ENV, {}, "rss")]
        settings.append(("default", {}, {}, "rss"))
    base = {"model": args.model, "device": args.device, "threads": args.threads}
    floor = {
        label: run_child({**base, **extra, "policy": "floor", "budget": None}, env) for label, env, extra, _ in settings
    }
    print(f"# {args.model} on {args.device}, {args.threads} thread(s), torch {torch.__version__}; one process per run")
    for label, _, _, key in settings:
        f = floor[label]
        print(f"# floor ({label}): computed {f['computed'] / 2**20:.2f} MiB, measured {f[key] / 2**20:.2f} MiB")
    head = "| policy | budget | computed peak | peak / reference |"
    for label, _, _, key in settings:
        head += f" {key} delta ({label}) | ratio | KV measured ({label}) | ratio |"
    print(head + (" reserved delta | ratio |" if cuda else ""))
    print("|---" * head.count("|") + "|")
    rows = []
    for name, budget in runs:
        spec = {**base, "policy": name, "budget": budget}
        got = {label: run_child({**spec, **extra}, env) for label, env, extra, _ in settings}
        first = got[settings[0][0]]
        computed = first["computed"]
        line = f"| {name} | {'-' if budget is None else budget} | {computed / 2**20:.2f} MiB | "
        line += f"{computed / first['reference']:.3f} |"
        row = {"policy": name, "budget": budget, "computed_peak_bytes": computed, "reference_bytes": first["reference"]}
        for label, _, _, key in settings:
            raw = got[label][key]
            kv = raw - floor[label][key] + floor[label]["computed"]
            line += f" {raw / 2**20:.2f} MiB | {raw / computed:.2f} | {kv / 2**20:.2f} MiB | {kv / computed:.2f} |"
            row[f"{key}_delta_bytes_{label}"] = raw
            row[f"measured_peak_bytes_{label}"] = kv
        if cuda:
            res = first["reserved"] - floor["allocator"]["reserved"] + floor["allocator"]["computed"]
            line += f" {first['reserved'] / 2**20:.2f} MiB | {res / computed:.2f} |"
            row["measured_reserved_bytes"] = res
        row["measured_peak_bytes"] = row[f"measured_peak_bytes_{settings[0][0]}"]
        rows.append(row)
        print(line, flush=True)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
