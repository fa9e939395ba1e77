"""ASI calibration (SPEC §3-§4): attention statistics of the full-cache model, drafters per scale, and the plan.

Three steps, each usable alone:

1. :func:`collect_stats` runs generations with the full cache through an :class:`AttentionStatsCache` and returns
   :class:`AttentionStats`: per (scale, layer) the current-map share and the top-K' history mass, measured from the
   layers' real attention, streamed in chunks.
2. :func:`plan_from_stats` turns statistics into a :class:`~scalekv.cache.plan.Plan`: ASI (sum or product of the
   two terms, or one term alone for ablations), standardised per scale, the ``num_drafters`` lowest Z among the
   (scale, layer) pairs of the compressed scales become drafters, and the SPEC §4 rule sets the capacities. The
   statistics travel inside the plan's provenance, so a plan file shows why it is what it is.
3. :func:`calibrate` does both for a pipeline and a budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache.base import check_budget, make_scales
from ..cache.plan import (
    PAPER_REFINER_END,
    PAPER_REFINER_START,
    Plan,
    average_capacity,
    check_refiner_schedule,
    first_compressed_scale,
    rule_plan,
)
from ..cache.scalekv import DEFAULT_GRID, DEFAULT_KERNEL, DEFAULT_POOLING, DEFAULT_SCORING, DEFAULT_SELECTION
from .asi import COMBINES, asi, pick_drafters, standardise
from .search import ImageFidelity, Row, Setting, score_baselines, search_record
from .search import search as run_search
from .stats import AttentionStatsCache

# Defaults chosen from the ablations on the demo model (README, "Calibration"): see there for the numbers.
DEFAULT_COMBINE = "product"
# N_d: this share of the (scale, layer) pairs of the compressed scales (the released Infinity plans: 6-7%), but at
# least one drafter per compressed scale on average (what a shallow model such as the demo's needs)
DEFAULT_DRAFTER_SHARE = 0.07


@dataclass(frozen=True)
class AttentionStats:
    """Per (scale, layer) means over every query of the current map (all rows, CFG halves included).

    ``current[k][l]``: share of attention on the current map; ``topk[k][l]``: history mass the ``top_k`` (K')
    largest history tokens hold; ``samples``: images generated; ``schedule``: the (h, w) of every scale.
    """

    schedule: tuple[tuple[int, int], ...]
    top_k: int
    samples: int
    current: torch.Tensor  # (scales, layers) float64
    topk: torch.Tensor  # (scales, layers) float64

    def __post_init__(self) -> None:
        t = self.current
        if t.dim() != 2 or t.shape != self.topk.shape or t.shape[0] != len(self.schedule):
            raise ValueError(
                f"statistics of shapes {tuple(self.current.shape)} and {tuple(self.topk.shape)}: expected two "
                f"(scales, layers) tables with {len(self.schedule)} scales"
            )

    @property
    def num_layers(self) -> int:
        return self.current.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": [list(s) for s in self.schedule],
            "top_k": self.top_k,
            "samples": self.samples,
            "current": _rounded(self.current),
            "topk": _rounded(self.topk),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionStats:
        try:
            return cls(
                tuple((int(h), int(w)) for h, w in data["schedule"]),
                int(data["top_k"]),
                int(data["samples"]),
                torch.tensor(data["current"], dtype=torch.float64),
                torch.tensor(data["topk"], dtype=torch.float64),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"calibration statistics are malformed ({type(e).__name__}: {e})") from None


def _rounded(t: torch.Tensor, digits: int = 6) -> list[list[float]]:
    return [[round(float(x), digits) for x in row] for row in t]


def collect_stats(
    generate: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    budget: float | None = None,
    top_k: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    query_chunk: int = 256,
    head_chunk: int = 4,
    progress: bool = False,
    seeding: str = "image",
    on_batch: Callable[[int, Any], None] | None = None,
) -> AttentionStats:
    """Run ``generate(batch, cache=..., seed=...)`` (a pipeline's ``generate`` with its sampling settings bound)
    over ``inputs`` (labels or prompts) in batches of ``batch_size`` and return the accumulated statistics. Under
    ``seeding="image"`` input ``j`` is seeded ``seed + j`` (``seed`` is then the list of its batch's seeds, so the
    images do not depend on ``batch_size``); under ``seeding="batch"`` batch ``i`` is seeded ``seed + i`` and
    ``generate`` also gets ``seeding="batch"``. K' is ``top_k`` tokens, or B of ``budget`` on the model's
    schedule. ``on_batch(start, generation)``, if given, sees every batch's result (``start``: its first input)."""
    from ..checks import check_seeding

    check_seeding(seeding)
    if not inputs:
        raise ValueError("calibration needs at least one input (a label or a prompt); got none")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    collector = AttentionStatsCache(top_k, history_budget=budget, query_chunk=query_chunk, head_chunk=head_chunk)
    starts = range(0, len(inputs), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="calibration", unit="batch")
    for i, start in enumerate(starts):
        batch = list(inputs[start : start + batch_size])
        if seeding == "image":
            gen = generate(batch, cache=collector, seed=[seed + start + k for k in range(len(batch))])
        else:
            gen = generate(batch, cache=collector, seed=seed + i, seeding="batch")
        if on_batch is not None:
            on_batch(start, gen)
    current, topk = collector.means()
    schedule = tuple((s.h, s.w) for s in collector.layout.scales)
    return AttentionStats(schedule, collector.top_k, len(inputs), current, topk)


def default_num_drafters(scales: int, layers: int, share: float = DEFAULT_DRAFTER_SHARE) -> int:
    """N_d for ``scales`` compressed scales of ``layers`` layers: ``round(share * scales * layers)``, at least
    ``scales`` (one drafter per compressed scale on average)."""
    return max(scales, round(share * scales * layers))


def plan_from_stats(
    stats: AttentionStats,
    budget: float,
    *,
    combine: str = DEFAULT_COMBINE,
    num_drafters: int | None = None,
    uniform: bool = False,
    refiner_start: float = PAPER_REFINER_START,
    refiner_end: float = PAPER_REFINER_END,
    model: str = "",
    extra: dict[str, Any] | None = None,
) -> Plan:
    """The ScaleKV plan for ``budget`` from ``stats``.

    ``num_drafters`` (N_d) defaults to :func:`default_num_drafters` of the compressed pairs. Drafters are the N_d
    lowest Z = per-scale standardised ASI among the pairs of the compressed scales (so their number varies per
    scale); capacities follow :func:`~scalekv.cache.plan.rule_plan`. ``uniform=True`` keeps the drafter flags
    but gives every layer B (the "uniform capacities" ablation). The provenance records every setting and the
    statistics: current, topk, asi and z per (scale, layer).
    """
    budget = check_budget(budget)
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: expected one of {COMBINES}")
    scales = make_scales(stats.schedule)
    layers = stats.num_layers
    avg = average_capacity(budget, scales)
    first = first_compressed_scale(scales, avg)
    compressed = [] if first is None else list(range(first, len(scales) - 1))
    pairs = len(compressed) * layers
    if num_drafters is None:
        num_drafters = _default_drafters(stats, budget)
    if isinstance(num_drafters, bool) or not isinstance(num_drafters, int) or not 0 <= num_drafters <= pairs:
        raise ValueError(
            f"num_drafters={num_drafters!r}: expected an integer in 0..{pairs} "
            f"({len(compressed)} compressed scales x {layers} layers at budget {budget})"
        )
    values = asi(stats.current, stats.topk, combine)
    z = standardise(values)
    flags = pick_drafters(z, compressed, num_drafters) if compressed else None  # nothing compressed: no drafters
    drafters = {k: [layer for layer in range(layers) if flags[k, layer]] for k in compressed}
    full_scales = [k for k, d in drafters.items() if len(d) == layers]
    if full_scales:
        raise ValueError(
            f"num_drafters={num_drafters} makes every layer a drafter at scales {full_scales}: "
            "expected at least one refiner per scale; use fewer drafters"
        )
    if uniform:  # refiners at B leave drafters B too
        refiner_start = refiner_end = 1.0
    plan = rule_plan(
        scales, layers, budget, drafters, refiner_start=refiner_start, refiner_end=refiner_end, model=model
    )
    provenance = {
        "rule": "scalekv-asi",
        "source": "scalekv calibrate (ASI, SPEC §3-§4)",
        "combine": combine,
        "num_drafters": num_drafters,
        "compressed_pairs": pairs,
        "uniform_capacities": uniform,
        "refiner_start": refiner_start,
        "refiner_end": refiner_end,
        "average_capacity": avg,
        **(extra or {}),
        "statistics": {**stats.to_dict(), "asi": _rounded(values), "z": _rounded(z)},
    }
    return dataclasses.replace(plan, provenance=provenance)


def plan_statistics(plan: Plan) -> dict[str, Any]:
    """The raw statistics block a calibrated plan carries (current, topk, asi, z, ...); a clear error otherwise."""
    data = plan.provenance.get("statistics")
    if not isinstance(data, dict):
        raise ValueError(f"the plan{' ' + repr(plan.model) if plan.model else ''} carries no calibration statistics")
    return data


def stats_from_plan(plan: Plan) -> AttentionStats:
    """The statistics a calibrated plan carries (for plots and inspection)."""
    return AttentionStats.from_dict(plan_statistics(plan))


def default_inputs(num_classes: int, samples: int) -> list[int]:
    """Class labels for VAR calibration: ``samples`` labels cycling 0, 1, ..., num_classes - 1, 0, ..."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: expected a positive number of calibration images")
    return [i % num_classes for i in range(samples)]


CALIBRATION_SEED = 1_000_000_000  # input j is seeded CALIBRATION_SEED + j: never an evaluation image (seeds 0..n-1)


def calibrate(
    pipe: Any,
    budget: float,
    inputs: Sequence[Any] | None = None,
    *,
    samples: int = 16,
    search: str = "fast",
    combine: str | None = None,
    num_drafters: int | None = None,
    refiner_start: float | None = None,
    refiner_end: float | None = None,
    selection: Mapping[str, Any] | None = None,
    baselines: Mapping[str, Callable[[], Any]] | None = None,
    batch_size: int = 16,
    seed: int = CALIBRATION_SEED,
    model: str = "",
    progress: bool = False,
    seeding: str = "image",
    **generate_kwargs: Any,
) -> Plan:
    """Calibrate a ScaleKV plan for ``pipe`` at ``budget``, its settings chosen by measurement.

    One full-cache pass over ``inputs`` collects the ASI statistics and keeps its images. With ``search`` 'fast'
    (the default) or 'full' the settings are then searched (:mod:`scalekv.calibration.search`) by the PSNR of
    ScaleKV's images against those full-cache images, and every policy of ``baselines`` (name -> cache factory;
    default: every registered policy but the full cache and ScaleKV, at ``budget``) is scored on the same images.
    The plan records the chosen settings, the whole search table and the baselines' scores (``provenance
    ["search"]``). ``search='off'`` makes the plan from the defaults without generating anything else.

    ``combine``, ``num_drafters`` (N_d), ``refiner_start``/``refiner_end`` and the ``selection`` keys (selection,
    grid, kernel, pooling, scoring) pin their setting: a pinned setting is not searched; one left out is searched,
    or under 'off' takes its default (ASI product, N_d of :func:`default_num_drafters`, the paper's refiner
    schedule, ScaleKV's default selection).

    ``inputs``: class labels (VAR) or prompts (Infinity); for a VAR pipeline they default to ``samples`` labels
    cycling over the classes (prompts must be given). ``generate_kwargs`` go to ``pipe.generate`` (sampling
    settings, Infinity's ``schedule``). Input ``j`` is seeded ``seed + j`` (the default seed lies beyond every
    evaluation seed); ``seeding='batch'`` (batch ``i`` seeded ``seed + i`` from one generator) works with
    ``search='off'`` only. Returns the plan; save it with :meth:`Plan.save`.

    Every argument is checked before the calibration pass. A budget whose B covers the whole prefix (e.g. 1.0)
    compresses no scale: the result is then the keep-everything plan, made without a calibration pass (there is
    nothing to choose), and it carries no statistics.
    """
    from ..cache.settings import check_selection
    from ..checks import check_seed, check_seeding
    from .search import check_mode

    budget = check_budget(budget)
    check_seeding(seeding)
    check_mode(search)
    if search != "off" and seeding != "image":
        raise ValueError(f"seeding={seeding!r} with search={search!r}: the search needs per-image seeding ('image')")
    if combine is not None and combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: expected one of {COMBINES}")
    refiners = None
    if refiner_start is not None or refiner_end is not None:
        refiners = (
            PAPER_REFINER_START if refiner_start is None else refiner_start,
            PAPER_REFINER_END if refiner_end is None else refiner_end,
        )
        check_refiner_schedule(*refiners)
    selection = dict(selection or {})
    check_selection(selection)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    if inputs is None:
        num_classes = getattr(getattr(getattr(pipe, "model", None), "cfg", None), "num_classes", None)
        if num_classes is None:
            raise ValueError("this pipeline is not class-conditional: pass inputs=[prompts] to calibrate it")
        inputs = default_inputs(num_classes, samples)
    check_seed(seed, count=len(inputs) if seeding == "image" else -(-len(inputs) // batch_size))
    layout = _layout(pipe, generate_kwargs)
    if layout is not None:
        scales, layers = layout.scales, layout.num_layers
        compressed = _compressed_scales(scales, average_capacity(budget, scales))
        pairs = len(compressed) * layers
        if num_drafters is not None and (
            isinstance(num_drafters, bool) or not isinstance(num_drafters, int) or not 0 <= num_drafters <= pairs
        ):
            raise ValueError(
                f"num_drafters={num_drafters!r}: expected an integer in 0..{pairs} "
                f"({len(compressed)} compressed scales x {layers} layers at budget {budget})"
            )
        if not compressed:
            plan = rule_plan(scales, layers, budget, [], model=model)
            provenance = {
                "rule": "keep-everything",
                "source": f"scalekv calibrate: budget {budget:g} keeps the whole {scales[-1].start}-token prefix, "
                "so no scale is compressed (no calibration pass)",
                "seed": seed,
                "seeding": seeding,
            }
            return dataclasses.replace(plan, provenance=provenance)
    if baselines is None and search != "off":
        baselines = default_baselines(budget)
    started = time.perf_counter()
    bound = bound_generate(pipe.generate, generate_kwargs)
    reference: list[torch.Tensor] = []

    def keep_images(start: int, gen: Any) -> None:
        from ..images import to_uint8

        reference.append(to_uint8(gen.images))

    stats = collect_stats(
        bound,
        inputs,
        budget=budget,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        seeding=seeding,
        on_batch=keep_images if search != "off" else None,
    )
    extra = {"seed": seed, "seeding": seeding, "generate": {k: v for k, v in generate_kwargs.items() if _is_plain(v)}}
    pinned = dict(selection)
    default_nd = _default_drafters(stats, budget)
    for key, value in (("combine", combine), ("drafters", num_drafters), ("refiners", refiners)):
        if value is not None:
            pinned[key] = value

    def make_plan(setting: Setting) -> Plan:
        plan = plan_from_stats(
            stats,
            budget,
            combine=setting.combine,
            num_drafters=setting.drafters,
            refiner_start=setting.refiners[0],
            refiner_end=setting.refiners[1],
            model=model,
            extra=extra,
        )
        chosen = selection if search == "off" else setting.selection_settings()
        return dataclasses.replace(plan, selection=chosen)

    sel = selection.get("selection", DEFAULT_SELECTION)
    start = Setting(
        selection=sel,
        grid=selection.get("grid", DEFAULT_GRID),
        kernel=selection.get("kernel", DEFAULT_KERNEL),
        pooling=selection.get("pooling", DEFAULT_POOLING[sel]),
        scoring=selection.get("scoring", DEFAULT_SCORING[sel]),
        keep_window=selection.get("keep_window", True),
        refiners=refiners or (PAPER_REFINER_START, PAPER_REFINER_END),
        drafters=num_drafters if num_drafters is not None else default_nd,
        combine=combine or DEFAULT_COMBINE,
    )
    if search == "off":
        return make_plan(start)
    from ..cache import make_cache

    score = ImageFidelity(bound, inputs, torch.cat(reference), seed, batch_size)
    report = None
    if progress:

        def report(row: Row) -> None:
            print(f"  search: {row.psnr:6.2f} dB  {row.setting.to_dict()}", flush=True)

    chosen, rows = run_search(
        make_plan,
        score,
        lambda plan, setting: make_cache("scalekv", plan=plan),
        mode=search,
        start=start,
        default_drafters=default_nd,
        pinned=pinned,
        progress=report,
    )
    scored = score_baselines(score, baselines)
    record = search_record(
        search, chosen, rows, scored, images=len(inputs), seconds=time.perf_counter() - started, pinned=pinned
    )
    plan = make_plan(chosen)
    return dataclasses.replace(plan, provenance={**plan.provenance, "search": record})


def default_baselines(budget: float) -> dict[str, Callable[[], Any]]:
    """Every registered policy but the full cache and ScaleKV, at ``budget`` with its defaults."""
    from ..cache import make_cache
    from ..cache.registry import POLICIES

    return {
        name: (lambda name=name: make_cache(name, budget=budget))
        for name in sorted(POLICIES)
        if name not in ("full", "scalekv")
    }


def _default_drafters(stats: AttentionStats, budget: float) -> int:
    scales = make_scales(stats.schedule)
    compressed = _compressed_scales(scales, average_capacity(budget, scales))
    return default_num_drafters(len(compressed), stats.num_layers) if stats.num_layers > 1 else 0


def _layout(pipe: Any, generate_kwargs: dict[str, Any]):
    """The cache layout ``pipe`` generates with (VAR: its schedule; Infinity: ``generate_kwargs["schedule"]``), or
    None where the pipeline does not say."""
    layout_of = getattr(getattr(pipe, "model", None), "cache_layout", None)
    if layout_of is None:
        return None
    if "schedule" not in generate_kwargs:
        try:
            return layout_of(rows=2, cond_rows=1)  # VAR: one schedule
        except TypeError:  # Infinity without a schedule: the one of its size argument
            from ..schedules import schedule_for_size

            schedule = schedule_for_size(*generate_kwargs.get("size", (1024, 1024)))
    else:
        schedule = generate_kwargs["schedule"]
    return layout_of(schedule, rows=2, cond_rows=1)


def _compressed_scales(scales, avg: int) -> list[int]:
    first = first_compressed_scale(scales, avg)
    return [] if first is None else list(range(first, len(scales) - 1))


def bound_generate(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` (a pipeline's ``generate``) with ``kwargs`` (sampling settings) bound: what :func:`collect_stats` runs.
    Binding keeps the sampling ``top_k`` apart from :func:`collect_stats`'s own ``top_k`` (K')."""

    def call(batch, *, cache, seed, **options):  # options: collect_stats's seeding="batch"
        return fn(batch, cache=cache, seed=seed, **options, **kwargs)

    return call


def _is_plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and not math.isfinite(value))
