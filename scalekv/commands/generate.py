"""``scalekv generate``: images for class labels (VAR) or prompts (Infinity), with any cache policy, plus stats.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images and write PNGs + stats.json")
    p.add_argument("--model", required=True, help="model name, e.g. var-d16, demo, infinity-2b")
    p.add_argument("--weights", help="folder with the model's checkpoint files")
    p.add_argument(
        "--labels",
        help="VAR: comma-separated class ids, e.g. 207,360 (default for a model with named classes, e.g. demo: one "
        "image of each class)",
    )
    p.add_argument("--prompt", action="append", help="Infinity: a text prompt (repeat for a batch)")
    p.add_argument("--vae", help="Infinity: the BSQ-VAE file (infinity_vae_d32reg.pth, ...)")
    p.add_argument("--t5", help="Infinity: local flan-t5-xl folder (never downloaded)")
    p.add_argument("--size", default="1024x1024", help="Infinity: WIDTHxHEIGHT, mapped to the nearest template")
    p.add_argument("--tau", type=float, default=None, help="Infinity: logit temperature (default 0.5)")
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed in [0, 2**63): image i is seeded seed + i (default 0)"
    )
    add_seeding_argument(p)
    p.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default: VAR 1.5, Infinity 3, demo its own)"
    )
    p.add_argument("--top-k", type=int, default=None, help="default: 900 (demo: its own)")
    p.add_argument("--top-p", type=float, default=None, help="default: VAR 0.96, Infinity 0.97, demo its own")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--policy", default="full", help="cache policy name (see `scalekv plan` / README)")
    p.add_argument("--budget", type=float, default=None, help="KV budget fraction in (0, 1]")
    p.add_argument("--plan", help="ScaleKV plan JSON (for --policy scalekv)")
    p.add_argument(
        "--kv-bits",
        type=int,
        default=16,
        choices=(16, 8, 4),
        help="bits per stored K/V value carried between scales: 16 (default, the compute dtype), 8 or 4 (quantised)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N, ...")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: new (created), empty, or the output of an earlier `scalekv generate`, which is replaced "
        "as a whole (its PNGs and stats.json are removed first, so runs never mix); a folder with other files is "
        "refused",
    )
    p.set_defaults(run=run)


def add_seeding_argument(p: argparse.ArgumentParser, default: str | None = "image") -> None:
    """``--seeding``, shared by generate, demo, eval and calibrate (eval's default is None: --config may set it)."""
    from ..checks import SEEDINGS

    p.add_argument(
        "--seeding",
        choices=SEEDINGS,
        default=default,
        help="image (default): image i has its own generator seeded seed + i, so it never depends on its batch; "
        "batch: one generator seeded seed for the whole batch, as the official implementations",
    )


def seed_record(seed: int, batch: int, seeding: str) -> dict:
    """What stats.json records about the seeds of a batch of ``batch`` images: the mode, the base seed and, per
    image, the seed of its generator (under ``batch`` seeding, every image shares the batch's seed)."""
    from ..checks import check_seeds

    seeds = check_seeds(seed, batch, "--seed", seeding=seeding)
    return {"seed": seed, "seeding": seeding, "seeds": seeds if seeding == "image" else seeds * batch}


def parse_labels(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected comma-separated integers such as 207,360") from None


def cache_from_args(args: argparse.Namespace, schedule=None):
    """The cache ``--policy`` names; without ``--plan`` it takes what :func:`scalekv.hub.policy_defaults` ships for
    the model and budget (ScaleKV's plan)."""
    from ..cache import make_cache
    from ..hub import policy_defaults

    defaults = policy_defaults(args.model, args.policy, args.budget, args.weights, schedule)
    if not args.plan:
        args.plan = defaults.get("plan")
        if args.plan:
            print(f"scalekv: using the plan shipped for {args.model}: {Path(args.plan).name}")
    kwargs = {k: v for k, v in defaults.items() if k != "plan"}  # e.g. the head-aware policies' statistics
    if args.budget is not None:
        kwargs["budget"] = args.budget
    if args.plan:
        kwargs["plan"] = args.plan
    if getattr(args, "kv_bits", 16) != 16:
        kwargs["kv_bits"] = args.kv_bits
    return make_cache(args.policy, **kwargs)


STATS = "stats.json"  # written last: the file that marks an output folder of `scalekv generate` complete


def _stats_files(stats: dict) -> list[str]:
    return list(stats["images"])


def check_out(path) -> Path:
    """``--out`` as :func:`scalekv.outputs.check_output_folder` takes it: new, empty or an earlier generate output."""
    from ..outputs import check_output_folder, owned_by

    return check_output_folder(
        path,
        owned=owned_by(STATS, _stats_files),
        expected="a new or empty folder, or one holding only an earlier `scalekv generate` output",
    )


def png_images(images: torch.Tensor, prefix: str = "") -> dict[str, bytes]:
    """(B, 3, H, W) images in [0, 1] as PNG files: name (``0000.png``, ...) -> bytes."""
    from ..images import png_bytes

    return {f"{prefix}{i:04d}.png": data for i, data in enumerate(png_bytes(images))}


def write_outputs(out: Path, gen, cache, stats: dict, what: str) -> int:
    """Write the PNGs and ``stats.json`` (``stats`` describes the inputs; the generation's own stats are added) into
    ``out``, in place of an earlier generate output there (:func:`scalekv.outputs.replace_output`)."""
    from ..outputs import replace_output

    files = png_images(gen.images)
    stats = {**stats, "images": list(files), **gen.stats()}
    replace_output(out, {**files, STATS: json.dumps(stats, indent=1).encode()}, STATS, _stats_files)
    print(
        f"wrote {len(files)} {what} and stats.json to {out} ({gen.seconds:.2f} s; KV peak "
        f"{gen.kv_bytes_peak / 2**20:.2f} MiB = {gen.kv_peak_ratio:.3f} of the reference full cache's "
        f"{gen.kv_bytes_reference / 2**20:.2f} MiB, history {gen.kv_history_ratio:.3f})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from ..checks import check_device, check_seed, check_seeding
    from ..hub import PROMPTS, default_sampling, input_kind, load_pipeline

    check_out(args.out)  # before anything is loaded
    check_seed(args.seed, "--seed")
    check_seeding(args.seeding, "--seeding")
    check_device(args.device, "--device")
    if input_kind(args.model) == PROMPTS:
        return run_infinity(args)
    for flag in ("prompt", "vae", "t5", "tau"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} applies to Infinity models only, not {args.model!r}")
    if args.labels is None:
        from ..hub import MODELS

        names = MODELS[args.model].class_names if args.model in MODELS else None
        if not names:
            raise ValueError(f"--labels is required for {args.model!r}")
        labels = list(range(len(names)))
    else:
        labels = parse_labels(args.labels)
    seeds = seed_record(args.seed, len(labels), args.seeding)  # refuses seed + len(labels) - 1 >= 2**63 up front
    sampling = default_sampling(args.model, args.weights)  # the official VAR settings; the demo model's own
    sampling = with_flags(sampling, args)
    cache = cache_from_args(args)
    pipe = load_pipeline(args.model, args.weights).to(args.device)
    gen = pipe.generate(
        labels,
        cache=cache,
        **sampling,
        seed=args.seed,
        greedy=args.greedy,
        seeding=args.seeding,
    )
    stats = {
        "model": args.model,
        "policy": args.policy,
        "kv_bits": args.kv_bits,
        "plan": args.plan,
        "labels": labels,
        **seeds,
        **sampling,
        "greedy": args.greedy,
    }
    return write_outputs(Path(args.out), gen, cache, stats, "images")


def with_flags(sampling: dict, args: argparse.Namespace) -> dict:
    """The model's sampling defaults with every flag the user gave (``--cfg``, ``--top-k``, ...) in their place."""
    return {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in sampling.items()}


def run_infinity(args: argparse.Namespace) -> int:
    """Text-to-image with an Infinity model: PNGs (RGB) + stats.json."""
    from ..hub import default_sampling, load_pipeline
    from ..schedules import parse_size, schedule_for_size

    if not args.prompt:
        raise ValueError(f"--prompt is required for {args.model!r}")
    if args.labels is not None or args.greedy:
        raise ValueError(f"--labels/--greedy apply to VAR models; for {args.model!r} use --prompt (and --top-k 1)")
    if args.t5 is None:
        raise ValueError("--t5 FOLDER (a local flan-t5-xl) is required to encode --prompt")
    seeds = seed_record(args.seed, len(args.prompt), args.seeding)
    schedule = schedule_for_size(*parse_size(args.size))
    sampling = with_flags(default_sampling(args.model), args)  # the official Infinity settings, unless overridden
    cache = cache_from_args(args, schedule)
    pipe = load_pipeline(args.model, args.weights, vae=args.vae, t5=args.t5).to(args.device)
    gen = pipe.generate(
        args.prompt,
        schedule=schedule,
        cache=cache,
        **sampling,
        seed=args.seed,
        seeding=args.seeding,
    )
    height, width = schedule.image_size
    stats = {
        "model": args.model,
        "policy": args.policy,
        "kv_bits": args.kv_bits,
        "plan": args.plan,
        "prompts": args.prompt,
        "size": f"{width}x{height}",
        "schedule": {"template": schedule.template, "pixels": schedule.pixels, "sizes": schedule.sizes},
        **seeds,
        **sampling,
    }
    return write_outputs(Path(args.out), gen, cache, stats, f"{width}x{height} images")
