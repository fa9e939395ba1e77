"""Reports of an evaluation: metrics.json/.csv/.md, plots and image grids, and the summary printed at the end."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..images import save_figure
from .storage import RunFolder, atomic_write_json, atomic_write_text

COLUMNS = [
    "policy",
    "budget",
    "kv_bits",
    "n",
    "psnr",
    "ssim",
    "lpips",
    "lpips_kind",
    "fid",
    "identical",
    "kv_bytes_history",
    "kv_history_ratio",
    "kv_bytes_peak",
    "kv_peak_ratio",
    "kv_bytes_reference",
    "cuda_peak_bytes",
    "rss_peak_bytes",
    "seconds_per_image",
]


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table: the columns of the ScaleKV paper's Table 1 (FID, LPIPS, PSNR against
    the full cache), SSIM, KV bytes per image (history, peak, their fractions of the reference full cache, and that
    reference) and time; ``bits`` is the stored K/V's bit width (16: the compute dtype)."""
    lpips_kind = next((r["lpips_kind"] for r in rows if r.get("lpips_kind")), None)
    head = [
        "policy",
        "budget",
        "bits",
        "FID ↓",
        f"LPIPS ({lpips_kind}) ↓" if lpips_kind else "LPIPS ↓",
        "PSNR (dB) ↑",
        "SSIM ↑",
        "KV history / image",
        "of ref.",
        "KV peak / image",
        "of ref.",
        "ref. KV / image",
        "s / image",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = "–" if r["budget"] is None else f"{100 * r['budget']:g}%"
        cells = [
            r["policy"],
            budget,
            str(r.get("kv_bits") or 16),  # rows of runs made before kv_bits existed are 16-bit
            _fmt(r["fid"], 2),
            _fmt(r["lpips"], 4),
            _fmt(r["psnr"], 2),
            _fmt(r["ssim"], 4),
            _bytes(r["kv_bytes_history"]),
            f"{100 * r['kv_history_ratio']:.1f}%",
            _bytes(r["kv_bytes_peak"]),
            f"{100 * r['kv_peak_ratio']:.1f}%",
            _bytes(r["kv_bytes_reference"]),
            f"{r['seconds_per_image']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    return buf.getvalue()


def check_plotting() -> None:
    """Fail early, with what to install, when matplotlib (the plots and grids) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        from ..metrics import MissingExtra

        raise MissingExtra(f"the plots need matplotlib (pip install 'scalekv[eval]' or matplotlib): {e}") from e


def _series_label(row: dict[str, Any]) -> str:
    """A plot line's label: the policy, with its bit width when quantised."""
    bits = row.get("kv_bits", 16)
    return row["policy"] if bits == 16 else f"{row['policy']} {bits}-bit"


def plot_fidelity(rows: Sequence[dict[str, Any]], path) -> None:
    """Fidelity (PSNR, SSIM, and LPIPS/FID when measured) against peak KV bytes per image, one line a policy (and
    bit width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["psnr"] is not None]  # every row but the reference
    series = list(dict.fromkeys(_series_label(r) for r in scored))
    metrics = [("psnr", "PSNR vs full (dB) ↑"), ("ssim", "SSIM vs full ↑")]
    metrics += [
        (k, label)
        for k, label in (("lpips", "LPIPS vs full ↓"), ("fid", "FID vs full ↓"))
        if any(r[k] is not None for r in rows)
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for label in series:
            pts = sorted(
                (r["kv_bytes_peak"] / 2**10, r[key]) for r in scored if _series_label(r) == label and r[key] is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("peak KV per image (KiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fidelity against the full cache vs peak KV memory")
    save_figure(fig, path, dpi=110, tight=True)


def plot_time(rows: Sequence[dict[str, Any]], path) -> None:
    """Seconds per image against the budget, one line a policy (and bit width); the full cache as horizontal
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    budgeted = [r for r in rows if r["budget"] is not None]
    for label in dict.fromkeys(_series_label(r) for r in budgeted):
        pts = sorted((100 * r["budget"], 1e3 * r["seconds_per_image"]) for r in budgeted if _series_label(r) == label)
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    styles = iter(("--", ":", "-."))
    for r in rows:
        if r["budget"] is None:
            label = "full cache" + ("" if r.get("kv_bits", 16) == 16 else f" {r['kv_bits']}-bit")
            ax.axhline(1e3 * r["seconds_per_image"], color="k", linestyle=next(styles, "--"), label=label)
    ax.set_xlabel("KV budget (%)")
    ax.set_ylabel("time per image (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110, tight=True)


def grid_image(folder: RunFolder, names: list[str], indices: list[int], path) -> None:
    """One row per setup in ``names``, one column per image index (the same seeds and labels in every row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(names), len(indices), figsize=(1.1 * len(indices) + 1.6, 1.1 * len(names)), squeeze=False
    )
    for r, name in enumerate(names):
        images = folder.load_images(name, indices).permute(0, 2, 3, 1).numpy()
        for c, im in enumerate(images):
            ax = axes[r][c]
            ax.imshow(np.asarray(im), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(f"#{indices[c]}", fontsize=7)
    save_figure(fig, path, dpi=110, tight=True)


def write_reports(folder: RunFolder, rows: list[dict[str, Any]], setups, config) -> None:
    """Write metrics.json, metrics.csv, metrics.md, the two plots and one grid per budget; print the summary."""
    root = folder.root
    atomic_write_json(root / "metrics.json", rows)
    atomic_write_text(root / "metrics.csv", csv_text(rows))
    table = markdown_table(rows)
    atomic_write_text(root / "metrics.md", table)
    plot_fidelity(rows, root / "plots" / "fidelity_vs_kv.png")
    plot_time(rows, root / "plots" / "time_vs_budget.png")
    indices = list(range(min(config.grid_images, config.n)))
    if indices:
        for budget in config.budgets:
            names = ["full"] + [s.name for s in setups if s.budget == float(budget)]
            grid_image(folder, names, indices, root / "grids" / f"budget_{float(budget):g}.png")
    inputs = f" (prompts {config.prompts}, {config.size})" if config.prompts else ""
    print(f"\n{config.model}: {rows[0]['n']} images per setup{inputs}, fidelity against the full cache\n")
    print(table)
    fid_note = "" if config.fid else " (FID off)"
    print(f"wrote metrics.json, metrics.csv, metrics.md, plots/ and grids/ to {root}{fid_note}")
