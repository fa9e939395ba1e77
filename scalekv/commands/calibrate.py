"""``scalekv calibrate``: a ScaleKV plan for a model, schedule and budget from ASI (SPEC §3-§4), plus its plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..cache.plan import PAPER_REFINER_END, PAPER_REFINER_START
    from ..cache.scalekv import SCORINGS, SELECTIONS
    from ..calibration.asi import COMBINES
    from ..calibration.calibrate import CALIBRATION_SEED, DEFAULT_COMBINE, DEFAULT_DRAFTER_SHARE
    from ..calibration.search import SEARCH_MODES
    from .generate import add_seeding_argument

    p = sub.add_parser(
        "calibrate",
        help="calibrate a ScaleKV plan (drafters, capacities, selection) from attention, its settings searched by "
        "fidelity to the full cache",
    )
    p.add_argument("--model", required=True, help="model name, e.g. demo, var-d16, infinity-2b")
    p.add_argument("--weights", help="folder with the model's checkpoint files")
    p.add_argument("--vae", help="Infinity: the BSQ-VAE file")
    p.add_argument("--t5", help="Infinity: local flan-t5-xl folder")
    p.add_argument("--size", default="1024x1024", help="Infinity: WIDTHxHEIGHT, mapped to the nearest template")
    p.add_argument("--prompts", help="Infinity: a text file with one calibration prompt per line")
    p.add_argument(
        "--budget",
        type=float,
        help="KV budget fraction in (0, 1], e.g. 0.1 (required for --method asi, unused otherwise); a budget that "
        "keeps the whole prefix (1.0) gives the keep-everything plan without a calibration pass",
    )
    p.add_argument("--samples", type=int, default=16, help="VAR: calibration images, labels cycling (default 16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--seed",
        type=int,
        default=CALIBRATION_SEED,
        help="calibration seed in [0, 2**63): image j is seeded seed + j (under --seeding batch, batch i seed + i); "
        f"default {CALIBRATION_SEED}, beyond every evaluation image's seed",
    )
    p.add_argument(
        "--search",
        choices=SEARCH_MODES,
        default="fast",
        help="how ScaleKV's settings are chosen: by the PSNR of its calibration images against the full cache's, "
        "one coordinate-descent pass (fast, the default) or passes over wider values until nothing moves (full); "
        "off takes the defaults. Every flag below that is given pins its setting (not searched)",
    )
    add_seeding_argument(p)
    p.add_argument("--combine", choices=COMBINES, help=f"ASI combination (searched; default {DEFAULT_COMBINE})")
    p.add_argument(
        "--drafters",
        type=int,
        default=None,
        help=f"N_d, drafter (scale, layer) pairs (searched around the default: {DEFAULT_DRAFTER_SHARE * 100:.0f}%% of "
        "the compressed pairs, at least one per compressed scale)",
    )
    p.add_argument(
        "--refiner-start",
        type=float,
        help="refiners at the first compressed scale, as a fraction of B (searched; default "
        f"{PAPER_REFINER_START:.3f}, the paper's 600/650)",
    )
    p.add_argument(
        "--refiner-end",
        type=float,
        help="refiners at the last compressed scale, as a fraction of B (searched; default "
        f"{PAPER_REFINER_END:.3f}, the paper's 320/650)",
    )
    p.add_argument(
        "--selection", choices=SELECTIONS, help="ScaleKV's token selection: SPEC's or the release's (searched)"
    )
    p.add_argument("--grid", type=int, help="ScaleKV's observation grid (searched; default SPEC's 4)")
    p.add_argument("--kernel", type=int, help="ScaleKV's pooling kernel, odd (searched; default SPEC's 5)")
    p.add_argument("--pooling", choices=("avg", "max"), help="ScaleKV's pooling (searched; default avg)")
    p.add_argument(
        "--scoring", choices=SCORINGS, help="ScaleKV's scores: softmax mass or raw logits (searched; default mass)"
    )
    p.add_argument(
        "--keep-window",
        choices=("yes", "no"),
        help="whether ScaleKV always keeps its observation window (searched; default yes, as the paper)",
    )
    p.add_argument(
        "--method",
        choices=("asi", "hack", "heatkv", "ams_kv"),
        default="asi",
        help="asi: a ScaleKV plan (default); hack/heatkv/ams_kv: the per-head statistics those policies read (budget "
        "unused)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-plots", action="store_true", help="skip the two PNGs next to the plan (<stem>_asi.png, _capacities.png)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="the plan JSON to write (its folder must exist); an existing file there is replaced only if it is a "
        "plan in our format, and so are the two PNGs next to it",
    )
    p.set_defaults(run=run)


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path!r}: no such file (expected one prompt per line)")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt (expected one prompt per line)")
    return prompts


def plot_paths(out: Path) -> list[Path]:
    """The two PNGs :func:`scalekv.calibration.plots.plot_plan` writes next to the plan ``out``."""
    stem = out.with_suffix("")
    return [stem.with_name(stem.name + "_asi.png"), stem.with_name(stem.name + "_capacities.png")]


def check_args(args: argparse.Namespace) -> Path:
    """Every argument that can be checked without the model, before it is loaded; returns the plan path."""
    from ..cache.base import check_budget
    from ..cache.settings import check_selection
    from ..checks import check_device, check_seed, check_seeding
    from ..outputs import check_output_file
    from .plan import check_plan_out

    out = check_plan_out(args.out, parent_must_exist=True)
    if not args.no_plots:
        for path in plot_paths(out):  # replaced along with the plan (see --out)
            check_output_file(path, flag="plot", owned=lambda p: p.suffix == ".png", expected="a PNG file name")
    if args.budget is None:
        raise ValueError("--budget is required for a ScaleKV plan (--method asi), e.g. --budget 0.1")
    check_budget(args.budget)
    for name in ("samples", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.drafters is not None and args.drafters < 0:
        raise ValueError(f"--drafters {args.drafters}: expected a number of drafter pairs >= 0")
    check_refiners(args.refiner_start, args.refiner_end)
    check_selection(selection_flags(args))
    if args.search != "off" and args.seeding != "image":
        raise ValueError(f"--seeding {args.seeding} with --search {args.search}: the search needs --seeding image")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected a positive number of threads")
    check_device(args.device, "--device")
    check_seeding(args.seeding, "--seeding")
    check_seed(args.seed, "--seed", count=_seed_count(args, args.samples))
    return out


def _seed_count(args: argparse.Namespace, inputs: int) -> int:
    """How many consecutive seeds from --seed calibrating ``inputs`` images uses (one per image or per batch)."""
    return inputs if args.seeding == "image" else -(-inputs // args.batch_size)


def selection_flags(args: argparse.Namespace) -> dict:
    from ..cache.settings import SELECTION_KEYS

    flags = {k: getattr(args, k) for k in SELECTION_KEYS if getattr(args, k) is not None}
    if "keep_window" in flags:
        flags["keep_window"] = flags["keep_window"] == "yes"
    return flags


def check_refiners(start: float | None, end: float | None) -> None:
    from ..cache.plan import PAPER_REFINER_END, PAPER_REFINER_START, check_refiner_schedule

    if start is None and end is None:
        return
    start = PAPER_REFINER_START if start is None else start
    end = PAPER_REFINER_END if end is None else end
    check_refiner_schedule(start, end, "--refiner-start", "--refiner-end")


def run(args: argparse.Namespace) -> int:

    import torch

    from ..calibration.calibrate import calibrate
    from ..checks import check_seed
    from ..hub import PROMPTS, default_sampling, input_kind, load_pipeline

    if args.method != "asi":
        from ..calibration.heads import run_cli

        return run_cli(args)
    out = check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if input_kind(args.model) == PROMPTS:
        from ..schedules import parse_size, schedule_for_size

        if not args.prompts or not args.t5:
            raise ValueError(f"{args.model!r} calibrates on prompts: give --prompts FILE and --t5 FOLDER")
        inputs = read_prompts(args.prompts)
        check_seed(args.seed, "--seed", count=_seed_count(args, len(inputs)))
        schedule = schedule_for_size(*parse_size(args.size))
        pipe = load_pipeline(args.model, args.weights, vae=args.vae, t5=args.t5).to(args.device)
        generate_kwargs = {"schedule": schedule}
    else:
        if args.prompts or args.vae or args.t5:
            raise ValueError(f"--prompts/--vae/--t5 apply to Infinity models only, not {args.model!r}")
        inputs = None
        generate_kwargs = default_sampling(args.model, args.weights)
        pipe = load_pipeline(args.model, args.weights).to(args.device)
    plan = calibrate(
        pipe,
        args.budget,
        inputs,
        samples=args.samples,
        search=args.search,
        selection=selection_flags(args),
        baselines=baseline_caches(args, generate_kwargs.get("schedule")),
        combine=args.combine,
        num_drafters=args.drafters,
        refiner_start=args.refiner_start,
        refiner_end=args.refiner_end,
        batch_size=args.batch_size,
        seed=args.seed,
        seeding=args.seeding,
        model=args.model,
        progress=True,
        **generate_kwargs,
    )
    plan.save(out)
    written = [out]
    if not plan.compressed_scales:
        for path in plot_paths(out):  # an earlier plan's pictures would describe another plan
            path.unlink(missing_ok=True)
        print(f"{plan.provenance['source']}: the plan keeps everything (no plots: there are no statistics)")
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    if not args.no_plots:
        from ..calibration.plots import plot_plan

        written += plot_plan(plan, out)
    drafters = {k: list(d) for k, d in enumerate(plan.drafters) if d}
    print(
        f"calibrated {args.model} at budget {plan.budget:g} (B = {plan.average_capacity:g} tokens per layer) on "
        f"{plan.provenance['statistics']['samples']} samples; drafters per scale {drafters}"
    )
    if "search" in plan.provenance:
        from .plan import search_lines

        print("\n".join(search_lines(plan.provenance["search"], top=3)))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def baseline_caches(args: argparse.Namespace, schedule) -> dict | None:
    """What the search scores ScaleKV against: every registered policy but the full cache and ScaleKV, with the
    files the model ships for it (a policy that needs a file the model lacks is recorded as skipped)."""
    if args.search == "off":
        return None
    from ..cache import make_cache
    from ..cache.registry import POLICIES
    from ..hub import with_policy_defaults

    def factory(name: str):
        options = with_policy_defaults({}, args.model, name, args.budget, args.weights, schedule)
        return lambda: make_cache(name, budget=args.budget, **options)

    return {name: factory(name) for name in sorted(POLICIES) if name not in ("full", "scalekv")}
