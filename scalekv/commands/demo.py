"""``scalekv demo``: the embedded demo model with the full cache and every registered policy at 10% (``--budgets``).

Generates the same labels with the same seed under every cache, writes one annotated grid (rows = caches) and
prints a table: the KV bytes the last scale reads as history and the peak KV bytes (both vs the full cache),
PSNR/SSIM of each image against its full-cache twin, and generation time vs the full cache (same run).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .eval import comma_separated
from .generate import add_seeding_argument, seed_record

BUDGETS = (0.1,)  # the default; `--budgets 0.1,0.2` gives the table in docs/demo.md
# A policy gets its budget and what scalekv.hub.policy_defaults ships for the model (ScaleKV: its plan in
# scalekv/weights/demo/plans/); a model that ships no ScaleKV plan gets one `calibrate` makes on the spot
# (CALIBRATION_SAMPLES images, seed 1000: never the demo's own images). A policy that needs more stops the demo with
# its own error (nothing is skipped).
CALIBRATION_SAMPLES = 16
DEMO_LABELS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)


@dataclass
class DemoRow:
    """One cache setting's result (bytes are measured by the cache, times by the generation)."""

    policy: str
    budget: float | None
    options: dict
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    stats: dict  # Generation.stats(): the memory figures (kv_bytes_history, kv_bytes_peak, ...) and times
    psnr: float = float("inf")
    ssim: float = 1.0

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.policy
        opts = "".join(f" {k}={v}" for k, v in self.options.items() if k != "plan")
        return f"{self.policy} {self.budget:.0%}{opts}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded demo model under every cache policy at 10%% (see --budgets)")
    p.add_argument(
        "--out",
        default="out/demo",
        help="output folder (default out/demo): new (created), empty, or an earlier `scalekv demo` output, which is "
        "replaced as a whole; a folder with other files is refused",
    )
    p.add_argument("--model", default="demo", help="model name (default: the embedded demo model)")
    p.add_argument("--weights", help="weights folder (default: the copy shipped in the package)")
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed in [0, 2**63): image i is seeded seed + i (default 0)"
    )
    add_seeding_argument(p)
    p.add_argument(
        "--budgets",
        type=comma_separated(float, "fractions"),
        default=list(BUDGETS),
        help="KV budget fractions every policy runs at, e.g. 0.1,0.2 (default 0.1; each adds one row per policy)",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        default=16,
        choices=(16, 8, 4),
        help="bits per stored K/V value for every policy row: 16 (default, the compute dtype), 8 or 4 (quantised); "
        "the full-cache reference row stays at 16",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is small, and more threads only lose time on a busy machine)",
    )
    p.set_defaults(run=run)


def cache_settings(budgets=BUDGETS) -> list[tuple[str, float | None, dict]]:
    """Every registered policy: the full cache once, each other policy at each of ``budgets``."""
    from ..cache import POLICIES, check_budget

    if not budgets:
        raise ValueError("budgets=[]: expected at least one KV budget fraction")
    budgets = [check_budget(b) for b in budgets]

    settings: list[tuple[str, float | None, dict]] = [("full", None, {})]
    for name in POLICIES:
        if name != "full":
            settings += [(name, b, {}) for b in budgets]
    return settings


def run_demo(
    pipe,
    labels,
    seed: int,
    sampling: dict,
    *,
    model: str,
    weights: str | None,
    seeding: str = "image",
    kv_bits: int = 16,
    budgets=BUDGETS,
) -> list[DemoRow]:
    """Generate ``labels`` under every cache setting; the first row is the full cache (the reference). ``model``
    and ``weights`` (as given to ``load_pipeline``) locate ScaleKV's shipped plans; ``seeding`` is the
    ``generate`` option (image ``i`` seeded ``seed + i``, or one generator for the batch); ``kv_bits`` (8 or 4)
    quantises the stored K/V of every policy row (each at every fraction in ``budgets``), the full-cache
    reference row staying at 16 bits (the per-head policies quantise each head's arena alike).
    Where the model ships no head statistics, the head-aware policies' are measured once, on the same images
    ScaleKV's plan would be calibrated on."""
    from ..cache import make_cache
    from ..calibration.calibrate import bound_generate, calibrate, default_inputs
    from ..calibration.heads import collect_head_stats
    from ..hub import HEAD_AWARE, policy_defaults
    from ..metrics import psnr, ssim

    # warm-up, so that one-time costs do not count against "full"
    pipe.generate(labels[:2], seed=seed, seeding=seeding, **sampling)
    rows: list[DemoRow] = []
    head_stats = None
    for name, budget, options in cache_settings(budgets):
        if budget is None:
            cache = make_cache(name)
        else:
            options = {**policy_defaults(model, name, budget, weights), **options}
            if kv_bits != 16:
                options["kv_bits"] = kv_bits
            source = Path(options["plan"]).name if "plan" in options else None
            if name == "scalekv" and source is None:
                options["plan"] = calibrate(
                    pipe, budget, samples=CALIBRATION_SAMPLES, model=model, search="off", **sampling
                )
                source = f"calibrated now on {CALIBRATION_SAMPLES} images, default settings (no plan ships)"
            if name in HEAD_AWARE and "calibration" not in options:
                if head_stats is None:
                    inputs = default_inputs(pipe.model.cfg.num_classes, CALIBRATION_SAMPLES)
                    head_stats = collect_head_stats(bound_generate(pipe.generate, sampling), inputs, model=model)
                options["calibration"] = head_stats
            cache = make_cache(name, budget=budget, **options)
            if name in HEAD_AWARE:  # the row records where the statistics came from
                given = options["calibration"]
                options = {**options, "calibration": Path(given).name if isinstance(given, str) else "measured now"}
            if source is not None:  # the row records where the plan came from
                options = {**options, "plan": source}
        gen = pipe.generate(labels, cache=cache, seed=seed, seeding=seeding, **sampling)
        row = DemoRow(name, budget, options, gen.images, gen.stats())
        if rows:
            ref = rows[0].images
            row.psnr = psnr(gen.images, ref).mean().item()
            row.ssim = ssim(gen.images, ref).mean().item()
        rows.append(row)
    return rows


def table(rows: list[DemoRow]) -> str:
    """A markdown table of the rows: KV bytes as fractions of the reference full cache (``kv_history_ratio``,
    ``kv_peak_ratio``), fidelity and time against the first (full-cache) row."""
    full = rows[0]
    lines = [
        "| cache | KV history (of reference) | KV peak (of reference) | PSNR vs full (dB) | SSIM vs full "
        "| time vs full |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "—" if r is full else f"{r.psnr:.2f}"
        ssim = "—" if r is full else f"{r.ssim:.3f}"
        st, seconds = r.stats, r.stats["seconds"]
        lines.append(
            f"| {r.label} | {st['kv_bytes_history'] / 1024:.0f} KiB ({st['kv_history_ratio']:.3f}) "
            f"| {st['kv_bytes_peak'] / 1024:.0f} KiB ({st['kv_peak_ratio']:.3f}) | {psnr} | {ssim} "
            f"| {seconds / full.stats['seconds']:.2f}x ({seconds * 1000:.0f} ms) |"
        )
    return "\n".join(lines)


def grid_image(rows: list[DemoRow], col_titles: list[str], zoom: int = 4):
    """One PIL image: a title column with each row's label, then the row's images upscaled ``zoom`` times."""
    import torch
    from PIL import ImageDraw

    from ..images import tile_grid

    b, _, h, w = rows[0].images.shape
    cell_h, cell_w, pad, left, top = h * zoom, w * zoom, 2, 190, 16
    canvas = tile_grid(torch.cat([r.images for r in rows]), b, zoom, pad, left, top)
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(col_titles):
        draw.text((left + j * (cell_w + pad) + 2, 2), title[:14], fill="black")
    for i, r in enumerate(rows):
        y = top + i * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 12), r.label, fill="black")
        if r.budget is not None:
            draw.text((4, y + cell_h // 2 + 2), f"PSNR {r.psnr:.1f} dB SSIM {r.ssim:.2f}", fill="gray")
    return canvas


RESULTS = "demo_results.json"  # written last: the file that marks a demo output folder complete
DEMO_FILES = ("demo_grid.png", "demo_table.md", RESULTS)


def _demo_files(results: dict) -> tuple[str, ...]:
    return DEMO_FILES


def run(args: argparse.Namespace) -> int:
    import io

    from ..checks import check_seed, check_seeding
    from ..hub import default_sampling, load_pipeline
    from ..outputs import check_output_folder, owned_by, replace_output

    out = check_output_folder(
        args.out,
        owned=owned_by(RESULTS, _demo_files),
        expected="a new or empty folder, or one holding only an earlier `scalekv demo` output "
        f"({', '.join(DEMO_FILES)})",
    )
    check_seeding(args.seeding, "--seeding")
    check_seed(args.seed, "--seed", count=len(DEMO_LABELS) if args.seeding == "image" else 1)
    try:
        cache_settings(args.budgets)
    except ValueError as err:
        raise ValueError(f"--budgets: {err}") from None
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected a positive number of threads")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, args.weights)
    sampling = default_sampling(args.model, args.weights)
    labels = list(DEMO_LABELS)
    rows = run_demo(
        pipe,
        labels,
        args.seed,
        sampling,
        model=args.model,
        weights=args.weights,
        seeding=args.seeding,
        kv_bits=args.kv_bits,
        budgets=args.budgets,
    )
    from ..hub import MODELS

    names = MODELS[args.model].class_names if args.model in MODELS else None
    titles = [names[i] if names else str(i) for i in labels]
    grid = io.BytesIO()
    grid_image(rows, titles).save(grid, format="PNG")
    text = table(rows)
    results = [
        {
            "cache": r.label,
            "policy": r.policy,
            "budget": r.budget,
            "options": r.options,
            **{k: v for k, v in r.stats.items() if k not in ("policy", "budget")},
            "psnr_vs_full": None if r.budget is None else r.psnr,
            "ssim_vs_full": None if r.budget is None else r.ssim,
        }
        for r in rows
    ]
    seeds = seed_record(args.seed, len(labels), args.seeding)
    meta = {"model": args.model, "labels": labels, **seeds, "sampling": sampling, "rows": results}
    contents = {"demo_grid.png": grid.getvalue(), "demo_table.md": (text + "\n").encode()}
    contents[RESULTS] = (json.dumps(meta, indent=1) + "\n").encode()
    grid_path, table_path, results_path = replace_output(out, contents, RESULTS, _demo_files)
    print(
        f"scalekv demo: model {args.model}, labels {labels}, seed {args.seed} ({args.seeding} seeding), "
        f"sampling {sampling}, "
        f"CPU threads: {torch.get_num_threads()}"
    )
    print(text)
    print(f"wrote {grid_path}, {table_path}, {results_path} ({time.perf_counter() - start:.1f} s in all)")
    return 0
