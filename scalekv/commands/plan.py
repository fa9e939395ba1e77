"""``scalekv plan``: show a ScaleKV plan (ours or a released budget file), or make one from a drafter list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cache.base import make_scales
from ..cache.plan import PAPER_REFINER_END, PAPER_REFINER_START, PLAN_FORMAT, Plan, load_plan, rule_plan

REPLACES = "an existing file there is replaced only if it is a plan in our format; any other file is refused"


def is_plan_file(path: Path) -> bool:
    """Whether ``path`` holds a plan in our JSON format (the only file a plan output may replace)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == PLAN_FORMAT


def check_plan_out(path, *, parent_must_exist: bool = False) -> Path:
    """``--out`` of a plan: a new ``.json`` file name, or a plan file of ours to replace."""
    from ..outputs import check_output_file

    out = check_output_file(
        path,
        owned=is_plan_file,
        expected="a new .json file name, or a plan file (our format) to replace",
        parent_must_exist=parent_must_exist,
    )
    if out.suffix != ".json":
        raise ValueError(f"--out {str(path)!r}: expected a .json file name")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show or make a ScaleKV plan (capacities per scale and layer)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = actions.add_parser("show", help="print a plan's capacities per scale and layer and its drafters")
    show.add_argument("file", help="plan JSON (ours or a released infinity_*_10pct.json)")
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(run=run_show)

    make = actions.add_parser("make", help="build a plan from an explicit drafter list with the SPEC §4 rule")
    make.add_argument("--model", help="a VAR preset (gives schedule and depth), e.g. var-d16")
    make.add_argument("--schedule", help="map sizes HxW,HxW,... (instead of --model), e.g. 1x1,2x2,4x4")
    make.add_argument("--layers", type=int, help="number of layers (with --schedule)")
    make.add_argument("--budget", type=float, required=True, help="KV budget fraction in (0, 1]")
    make.add_argument("--drafters", required=True, help="comma-separated drafter layers, e.g. 0,23 (may be empty)")
    make.add_argument("--refiner-start", type=float, default=PAPER_REFINER_START, help="first refiner capacity / B")
    make.add_argument("--refiner-end", type=float, default=PAPER_REFINER_END, help="last refiner capacity / B")
    make.add_argument("--out", required=True, help=f"plan JSON to write ({REPLACES})")
    make.set_defaults(run=run_make)


def summary(plan: Plan) -> dict[str, Any]:
    """Everything ``plan show`` prints: per scale the drafters, the mean drafter and refiner capacity (an int when
    the group is uniform, None when empty) and every layer's capacity, in tokens."""
    scales = []
    for s in plan.scales:
        caps, drafters = plan.capacities[s.index], plan.drafters[s.index]
        refiners = [c for layer, c in enumerate(caps) if layer not in drafters]
        scales.append(
            {
                "index": s.index,
                "h": s.h,
                "w": s.w,
                "end": s.end,
                "compressed": plan.compressed(s.index),
                "drafters": list(drafters),
                "drafter_capacity": _mean([caps[d] for d in drafters]),
                "refiner_capacity": _mean(refiners),
                "mean_capacity": _mean(list(caps)),
                "capacities": list(caps),
            }
        )
    return {
        "model": plan.model,
        "budget": plan.budget,
        "average_capacity": _mean([plan.average_capacity]),
        "num_layers": plan.num_layers,
        "schedule": [list(hw) for hw in plan.schedule],
        "compressed_scales": plan.compressed_scales,
        "scales": scales,
        "selection": dict(plan.selection),
        "provenance": dict(plan.provenance),
    }


def _mean(values: list[float]) -> int | float | None:
    if not values:
        return None
    m = sum(values) / len(values)
    return int(m) if m == int(m) else round(m, 2)


def _origin(info: dict[str, Any]) -> list[str]:
    """Lines on how a plan was made (calibration settings) and the selection settings it records, if any."""
    lines = []
    prov = info["provenance"]
    if prov.get("rule") == "scalekv-asi":
        stats = prov.get("statistics", {})
        lines.append(
            f"calibrated: ASI {prov.get('combine')}, N_d = {prov.get('num_drafters')} of "
            f"{prov.get('compressed_pairs')} pairs, refiners {prov.get('refiner_start'):.3g} -> "
            f"{prov.get('refiner_end'):.3g} of B, K' = {stats.get('top_k')}, {stats.get('samples')} samples"
        )
    if info["selection"]:
        settings = (str(v) if k == "selection" else f"{k} {v}" for k, v in info["selection"].items())
        lines.append("selection: " + ", ".join(settings))
    if isinstance(prov.get("search"), dict):
        lines += search_lines(prov["search"])
    return lines


def _setting_text(row: dict[str, Any]) -> str:
    start, end = row["refiners"]
    scoring = "" if row["selection"] == "release" else f" {row['scoring']}"
    if row["selection"] != "release" and not row.get("keep_window", True):
        scoring += " window-scored"
    return (
        f"{row['selection']}{scoring} grid {row['grid']} kernel {row['kernel']} {row['pooling']}, "
        f"refiners {start:.3g}->{end:.3g}, N_d {row['drafters']}, ASI {row['combine']}"
    )


def search_lines(record: dict[str, Any], top: int | None = None) -> list[str]:
    """How a searched plan was chosen: its setting and score, the search table (best first; ``top`` rows, or all),
    and every baseline's score on the same images."""
    chosen = record["chosen"]
    pinned = f", pinned: {', '.join(record['pinned'])}" if record.get("pinned") else ""
    lines = [
        f"search ({record['mode']}, {len(record['table'])} settings on {record['images']} calibration images, "
        f"{record['seconds']:g} s{pinned}): chosen {_setting_text(chosen)}: {chosen['psnr']:.2f} dB, "
        f"SSIM {chosen['ssim']:.4f} against the full cache",
    ]
    table = sorted(record["table"], key=lambda r: -r["psnr"])
    shown = table if top is None else table[:top]
    lines += [f"  {r['psnr']:6.2f} dB  {r['ssim']:.4f}  {_setting_text(r)}" for r in shown]
    if len(shown) < len(table):
        lines.append(f"  ... {len(table) - len(shown)} more (scalekv plan show)")
    scored = sorted((b for b in record["baselines"] if "psnr" in b), key=lambda b: -b["psnr"])
    if scored:
        lines.append(
            "baselines at the same budget, same images: "
            + ", ".join(f"{b['policy']} {b['psnr']:.2f} dB" for b in scored)
        )
    lines += [f"  {b['policy']}: skipped ({b['skipped']})" for b in record["baselines"] if "skipped" in b]
    return lines


def render(info: dict[str, Any]) -> str:
    """Human-readable tables: one line per scale, then the capacity matrix (layers x scales)."""
    lines = [
        f"plan {info['model'] or '(unnamed)'}: budget {info['budget']}, "
        f"B = {info['average_capacity']} tokens per layer, {info['num_layers']} layers, "
        f"{len(info['schedule'])} scales, compressed after scales {info['compressed_scales']}",
        *_origin(info),
        "",
        f"{'scale':>5} {'size':>7} {'end':>6} {'compr':>5} {'drafter':>8} {'refiner':>8} {'mean':>8}  drafters",
    ]
    for s in info["scales"]:
        dash = "-"
        lines.append(
            f"{s['index']:>5} {s['h']:>3}x{s['w']:<3} {s['end']:>6} {'yes' if s['compressed'] else 'no':>5} "
            f"{s['drafter_capacity'] if s['drafter_capacity'] is not None else dash:>8} "
            f"{s['refiner_capacity'] if s['refiner_capacity'] is not None else dash:>8} {s['mean_capacity']:>8}  "
            f"{','.join(map(str, s['drafters'])) or dash}"
        )
    width = max(len(str(c)) for s in info["scales"] for c in s["capacities"]) + 1
    lines += [
        "",
        "capacity after each scale (tokens; * = drafter)",
        "layer " + "".join(f"{s['index']:>{width + 1}}" for s in info["scales"]),
    ]
    for layer in range(info["num_layers"]):
        cells = "".join(
            f"{s['capacities'][layer]:>{width}}{'*' if layer in s['drafters'] else ' '}" for s in info["scales"]
        )
        lines.append(f"{layer:>5} {cells}")
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    info = summary(load_plan(args.file))
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


def parse_schedule(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 for s in sizes):
        raise ValueError(f"--schedule {text!r}: expected map sizes HxW separated by commas, e.g. 1x1,2x2,4x4")
    return sizes


def parse_layers(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--drafters {text!r}: expected comma-separated layer indices such as 0,23") from None


def run_make(args: argparse.Namespace) -> int:
    out = check_plan_out(args.out)
    if (args.model is None) == (args.schedule is None):
        raise ValueError("give exactly one of --model and --schedule (with --layers)")
    if args.model is not None:
        from ..hub import MODELS

        fixed = sorted(n for n, e in MODELS.items() if e.family == "var" and e.preset is not None)
        if args.model not in fixed:
            raise ValueError(f"--model {args.model!r}: expected one of {fixed} (or use --schedule)")
        cfg = MODELS[args.model].preset
        scales, layers, model = cfg.scales, cfg.depth, args.model
    else:
        if args.layers is None:
            raise ValueError("--schedule needs --layers")
        scales, layers, model = make_scales(parse_schedule(args.schedule)), args.layers, ""
    plan = rule_plan(
        scales,
        layers,
        args.budget,
        parse_layers(args.drafters),
        refiner_start=args.refiner_start,
        refiner_end=args.refiner_end,
        model=model,
    )
    path = plan.save(out)
    print(
        f"wrote {path}: B = {plan.average_capacity:g} tokens per layer, compressed after scales "
        f"{plan.compressed_scales}"
    )
    return 0
