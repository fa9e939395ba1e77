"""Pictures of a calibrated plan: ASI per (layer, scale) with the drafters marked, and the capacities.

matplotlib (Agg, no display) is needed; it is in the ``eval`` and ``dev`` extras.
"""

from __future__ import annotations

from pathlib import Path

from ..cache.plan import Plan
from ..images import save_figure
from .calibrate import plan_statistics


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"plots need matplotlib (pip install 'scalekv[eval]'): {e}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale_labels(plan: Plan) -> list[str]:
    return [f"{k}: {h}x{w}" for k, (h, w) in enumerate(plan.schedule)]


def plot_asi(plan: Plan, path: str | Path) -> Path:
    """Heatmap of ASI (layers x scales) from the plan's statistics; drafters boxed, uncompressed scales greyed."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    values = plan_statistics(plan)["asi"]
    layers, scales = plan.num_layers, len(plan.schedule)
    grid = [[values[k][layer] for k in range(scales)] for layer in range(layers)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * scales, 1.2 + 0.3 * layers), constrained_layout=True)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    compressed = set(plan.compressed_scales)
    for k in range(scales):
        if k not in compressed:
            ax.add_patch(Rectangle((k - 0.5, -0.5), 1, layers, color="white", alpha=0.6, linewidth=0))
        for layer in plan.drafters[k]:
            ax.add_patch(Rectangle((k - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(scales), _scale_labels(plan), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    ax.set_xlabel("scale")
    ax.set_ylabel("layer")
    combine = plan.provenance.get("combine", "?")
    ax.set_title(f"ASI ({combine}); red = drafter, pale = not compressed; budget {plan.budget:g}", fontsize=8)
    fig.colorbar(image, ax=ax, label="ASI (high = refiner)")
    return save_figure(fig, path, dpi=120)


def plot_capacities(plan: Plan, path: str | Path) -> Path:
    """Capacity per layer at every compressed scale (one line per scale), with the layer average B dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6), constrained_layout=True)
    for k in plan.compressed_scales:
        h, w = plan.schedule[k]
        ax.plot(range(plan.num_layers), plan.capacities[k], marker="o", markersize=3, label=f"after {h}x{w}")
    ax.axhline(
        plan.average_capacity, color="black", linestyle="--", linewidth=1, label=f"B = {plan.average_capacity:g}"
    )
    shown = [c for k in plan.compressed_scales for c in plan.capacities[k]]
    if shown and max(shown) > 20 * min(shown):  # drafters near-uncompressed next to small refiners (Infinity)
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens kept")
    ax.set_title(f"capacities per layer and scale; budget {plan.budget:g}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=120)


def plot_plan(plan: Plan, plan_path: str | Path) -> list[Path]:
    """Both pictures next to ``plan_path``: ``<stem>_asi.png`` and ``<stem>_capacities.png``."""
    plan_path = Path(plan_path)
    stem = plan_path.with_suffix("")
    return [
        plot_asi(plan, f"{stem}_asi.png"),
        plot_capacities(plan, f"{stem}_capacities.png"),
    ]
