"""Calibration that measures: ScaleKV's settings chosen by how close its images come to the full cache's.

The full-cache pass that collects the ASI statistics also keeps its images (uint8, the only images kept). Every
candidate setting is then a plan made from those same statistics (no new statistics pass) plus a selection, and is
scored by generating the calibration images again with that ScaleKV cache, same inputs and seeds, and measuring
PSNR/SSIM against the full-cache images. Nothing but per-image scores survives a candidate, and every result is
remembered, so a setting is never generated twice.

The search runs coordinate descent once from each way to select (the 'spec' selection with its window kept, the same
with the window scored like any token, the 'release' selection: :func:`selection_starts`), because a greedy step
between them can lead into a worse basin. Each run moves along the other :data:`DIMENSIONS` one at a time: every
value is tried with the others fixed and the best mean PSNR is kept (a tie keeps the earlier value, so the search is
deterministic). ``fast`` makes one pass over :data:`FAST_VALUES` per run; ``full`` repeats passes over the wider
:data:`FULL_VALUES` until a pass changes nothing. A dimension the caller pins is not searched. The setting kept is
the best row of the recorded table, the earliest among equals.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..cache.plan import PAPER_REFINER_END, PAPER_REFINER_START, Plan
from ..cache.scalekv import DEFAULT_GRID, DEFAULT_KERNEL, DEFAULT_POOLING, DEFAULT_SCORING, DEFAULT_SELECTION

SEARCH_MODES = ("off", "fast", "full")
# the order coordinate descent visits them in: the selection first (it moves PSNR the most), then the plan's rule
DIMENSIONS = ("selection", "keep_window", "grid", "kernel", "pooling", "scoring", "refiners", "drafters", "combine")
# the first group is the way to select (one coordinate-descent run starts from each); the others are single steps
GROUPS = (("selection", "keep_window"), *((d,) for d in DIMENSIONS[2:]))
PAPER_REFINERS = (PAPER_REFINER_START, PAPER_REFINER_END)

# N_d as multiples of the default count (rounded, kept where a plan can be made with it)
FAST_VALUES: dict[str, tuple] = {
    "selection": ("spec", "release"),
    "grid": (2, 4),
    "kernel": (1, 3, 5),
    "pooling": ("avg", "max"),
    "scoring": ("mass", "logits"),
    "keep_window": (True, False),
    "refiners": (PAPER_REFINERS, (1.0, 0.8), (1.0, 1.0)),
    "drafters": (0.5, 1.0, 2.0),
    "combine": ("product", "sum"),
}
FULL_VALUES: dict[str, tuple] = {
    **FAST_VALUES,
    "grid": (1, 2, 3, 4, 6),
    "kernel": (1, 3, 5, 7),
    "refiners": (PAPER_REFINERS, (1.0, 0.8), (1.0, 0.6), (0.9, 0.7), (0.8, 0.5), (1.0, 1.0)),
    "drafters": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0),
    "combine": ("product", "sum", "topk", "current"),
}
MAX_FULL_PASSES = 4


@dataclass(frozen=True)
class Setting:
    """One candidate: ScaleKV's selection settings and the plan rule's (refiner schedule, N_d, ASI combination).
    ``drafters`` is N_d, the number of drafter (scale, layer) pairs."""

    selection: str = DEFAULT_SELECTION
    grid: int = DEFAULT_GRID
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING[DEFAULT_SELECTION]
    scoring: str = DEFAULT_SCORING[DEFAULT_SELECTION]
    keep_window: bool = True
    refiners: tuple[float, float] = PAPER_REFINERS
    drafters: int = 0
    combine: str = "product"

    def normalised(self) -> Setting:
        """The release scores by raw logits only and always keeps its window: its rows always say so."""
        if self.selection == "release":
            return dataclasses.replace(self, scoring="logits", keep_window=True)
        return self

    def selection_settings(self) -> dict[str, Any]:
        """What the plan's ``selection`` block records (what :class:`~scalekv.cache.scalekv.ScaleKV` reads)."""
        return {k: getattr(self, k) for k in ("selection", "grid", "kernel", "pooling", "scoring", "keep_window")}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.selection_settings(),
            "refiners": list(self.refiners),
            "drafters": self.drafters,
            "combine": self.combine,
        }


@dataclass
class Row:
    """A scored candidate: mean PSNR (dB) and SSIM of its images against the full cache's."""

    setting: Setting
    psnr: float
    ssim: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.setting.to_dict(), "psnr": round(self.psnr, 4), "ssim": round(self.ssim, 5)}


def check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in SEARCH_MODES:
        raise ValueError(f"search={mode!r}: expected one of {', '.join(map(repr, SEARCH_MODES))}")
    return mode


def candidates(dimension: str, mode: str, default_drafters: int, pinned: Mapping[str, Any]) -> list[Any]:
    """The values ``dimension`` takes in a ``mode`` search: the pinned value alone where the caller fixed it."""
    if dimension in pinned:
        return [pinned[dimension]]
    values = (FAST_VALUES if mode == "fast" else FULL_VALUES)[dimension]
    if dimension == "drafters":
        counts = [round(m * default_drafters) for m in values]
        return sorted(set(counts), key=counts.index)
    return list(values)


ImageScorer = Callable[[Callable[[], Any]], tuple[np.ndarray, np.ndarray]]


def search(
    make_plan: Callable[[Setting], Plan],
    score: ImageScorer,
    make_scalekv: Callable[[Plan, Setting], Any],
    *,
    mode: str = "fast",
    start: Setting,
    default_drafters: int,
    pinned: Mapping[str, Any] | None = None,
    progress: Callable[[Row], None] | None = None,
) -> tuple[Setting, list[Row]]:
    """Coordinate descent from ``start``, once from each way to select (:func:`selection_starts`; the best of the
    runs wins; ``off``: ``start`` alone, scored). ``make_plan(setting)`` builds the plan (a ``ValueError`` marks a
    setting that cannot be made, e.g. too many drafters: it is skipped); ``make_scalekv(plan, setting)`` its cache;
    ``score(cache_factory)`` generates the calibration images with fresh caches from ``cache_factory`` and returns
    per-image PSNR and SSIM. Returns the chosen setting and every scored row, in the order they were scored."""
    check_mode(mode)
    pinned = dict(pinned or {})
    rows: dict[Setting, Row] = {}

    def evaluate(setting: Setting) -> Row | None:
        setting = setting.normalised()
        if setting not in rows:
            try:
                plan = make_plan(setting)
            except ValueError:
                return None
            psnr, ssim = score(lambda: make_scalekv(plan, setting))
            rows[setting] = Row(setting, float(psnr.mean()), float(ssim.mean()))
            if progress is not None:
                progress(rows[setting])
        return rows[setting]

    first = evaluate(start.normalised())
    if first is None:
        raise ValueError(f"the starting setting {start.to_dict()} makes no valid plan")
    if mode == "off":
        return first.setting, list(rows.values())
    overall = first
    for way in selection_starts(start, mode, default_drafters, pinned):
        best = evaluate(way)
        if best is None:
            continue
        for _ in range(1 if mode == "fast" else MAX_FULL_PASSES):
            moved = False
            for group in GROUPS[1:]:  # the selection is this start's
                if group == ("scoring",) and best.setting.selection == "release":
                    continue  # the release has one scoring
                for values in itertools.product(*(candidates(d, mode, default_drafters, pinned) for d in group)):
                    row = evaluate(dataclasses.replace(best.setting, **dict(zip(group, values, strict=True))))
                    if row is not None and row.psnr > best.psnr:
                        best, moved = row, True
            if not moved:
                break
        if best.psnr > overall.psnr:
            overall = best
    return overall.setting, list(rows.values())


def selection_starts(start: Setting, mode: str, default_drafters: int, pinned: Mapping[str, Any]) -> list[Setting]:
    """One starting point per way to select (spec with its window kept, spec with it scored, release) that the
    pinned settings allow, the rest as ``start``; ``start``'s own way first."""
    ways = []
    for selection, keep in itertools.product(*(candidates(d, mode, default_drafters, pinned) for d in GROUPS[0])):
        if selection == "release" and not keep:
            continue  # the release always keeps its window
        way = dataclasses.replace(start, selection=selection, keep_window=keep)
        if selection != start.selection:  # another selection starts from its own defaults for these two
            way = dataclasses.replace(way, pooling=DEFAULT_POOLING[selection], scoring=DEFAULT_SCORING[selection])
        way = way.normalised()
        if way not in ways:
            ways.append(way)
    own = start.normalised()
    return sorted(ways, key=lambda w: w != own)


class ImageFidelity:
    """Scores caches by their images against the full cache's on the calibration inputs.

    ``generate(batch, cache=..., seed=[...])`` is the pipeline's ``generate`` with its sampling settings bound;
    ``reference`` the full-cache images, uint8 ``(N, 3, H, W)``, of ``inputs`` with input ``j`` seeded
    ``seed + j`` (per-image seeding: the batch size does not change an image)."""

    def __init__(self, generate, inputs: Sequence[Any], reference: torch.Tensor, seed: int, batch_size: int) -> None:
        if reference.shape[0] != len(inputs):
            raise ValueError(f"{reference.shape[0]} reference images for {len(inputs)} inputs")
        self.generate, self.inputs, self.reference = generate, list(inputs), reference
        self.seed, self.batch_size = seed, batch_size
        self.generations = 0  # how many caches were scored

    def __call__(self, make_cache: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray]:
        from ..images import to_uint8
        from ..metrics import psnr_ssim

        psnr, ssim = [], []
        for start in range(0, len(self.inputs), self.batch_size):
            batch = self.inputs[start : start + self.batch_size]
            gen = self.generate(batch, cache=make_cache(), seed=[self.seed + start + k for k in range(len(batch))])
            p, s = psnr_ssim(self.reference[start : start + len(batch)], to_uint8(gen.images))
            psnr.append(p)
            ssim.append(s)
            del gen  # nothing of a candidate's generation outlives its scores
        self.generations += 1
        return np.concatenate(psnr), np.concatenate(ssim)


def score_baselines(score: ImageScorer, policies: Mapping[str, Callable[[], Any]]) -> list[dict[str, Any]]:
    """Every policy of ``policies`` (name -> cache factory; a factory raising ``ValueError`` means the policy cannot
    run here, e.g. it needs a calibration file: recorded as skipped with the reason), scored like the candidates."""
    out = []
    for name, factory in policies.items():
        try:
            factory()
        except ValueError as e:
            out.append({"policy": name, "skipped": str(e)})
            continue
        psnr, ssim = score(factory)
        out.append({"policy": name, "psnr": round(float(psnr.mean()), 4), "ssim": round(float(ssim.mean()), 5)})
    return out


def search_record(
    mode: str,
    chosen: Setting,
    rows: list[Row],
    baselines: list[dict[str, Any]],
    *,
    images: int,
    seconds: float,
    pinned: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``search`` block of a plan's provenance: how the setting was chosen and what it beats."""
    best = next(r for r in rows if r.setting == chosen)
    return {
        "mode": mode,
        "metric": "mean PSNR (dB) against the full cache's images on the calibration inputs",
        "images": images,
        "seconds": round(seconds, 1),
        "pinned": sorted(pinned),
        "chosen": best.to_dict(),
        "table": [r.to_dict() for r in rows],
        "baselines": baselines,
    }
