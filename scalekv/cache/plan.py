"""Budgets and plans: how many tokens every layer keeps after every scale.

A budget fraction ``b`` in (0, 1] sets the average per-layer capacity ``B = round(b * P)`` tokens, where ``P`` is
the prefix the last scale attends to (the cumulative length before it; SPEC §4). A :class:`Plan` is the table
``capacities[scale][layer]``: the tokens ``layer`` retains after ``scale`` has been processed, for every scale of
one schedule. Scales whose cumulative length does not exceed ``B`` keep everything; from the first one that does,
the layer average is ``B`` at every scale; the last scale is never compressed (its entry is what the layer holds).

Plans come from four places, all producing the same :class:`Plan`:

* :func:`uniform_plan` and :func:`pyramid_plan` for the baselines (capacity equal, or decreasing with depth);
* :func:`rule_plan`, the ScaleKV rule for an explicit drafter list: refiners decay linearly, drafters share what
  remains, nobody gets more than it holds (until calibration produces drafter lists);
* :func:`load_plan` for our JSON format (:meth:`Plan.save`) and for the two released ScaleKV budget files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import CacheLayout, Scale, check_budget, make_scales
from .settings import SELECTION_KEYS, check_selection  # noqa: F401  (SELECTION_KEYS: what a plan may carry)

PLAN_FORMAT = "scalekv-plan/1"

# plans shipped with the package: the released ScaleKV budget files (verbatim copies of ../shared/reference/budgets)
PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"

# Infinity 1024x1024 (1M pixels, aspect 1:1): the schedule the released budget files were made for (MODELS.md §2.5)
INFINITY_1M_SQUARE: tuple[tuple[int, int], ...] = tuple((s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64))

# The paper's refiner schedule for Infinity-2B at 10% (B_r(0) = 600, delta = 70 over 5 compressed scales, B = 650),
# as fractions of B so that it applies to any budget and schedule: refiners start at 600/650 B, end at 320/650 B.
PAPER_REFINER_START = 600 / 650
PAPER_REFINER_END = 320 / 650


def average_capacity(budget: float, scales: Sequence[Scale]) -> int:
    """``B``: tokens kept per layer on average for budget fraction ``budget`` on ``scales`` (SPEC §4)."""
    budget = check_budget(budget)
    prefix = scales[-1].start
    avg = round(budget * prefix)
    if avg < 1:
        raise ValueError(
            f"budget={budget!r} keeps {budget * prefix:.3g} tokens of the {prefix}-token prefix; expected at least 1"
        )
    return avg


def allocate(total: int, targets: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` tokens over layers: integer capacities summing to ``min(total, sum(caps))``.

    Every layer keeps at least one token and never more than its cap (what it holds); the rest is shared in
    proportion to ``targets`` (tokens, >= 0), and whatever a capped layer cannot take goes to the others in the
    same proportion. Rounding gives the leftover tokens to the largest fractional parts (lowest layer on ties).
    """
    n = len(caps)
    if total >= sum(caps):
        return [int(c) for c in caps]
    if total < n:
        raise ValueError(f"{total} tokens cannot give each of {n} layers at least one token")
    room = [int(c) - 1 for c in caps]
    share = [0.0] * n
    free = [i for i in range(n) if room[i] > 0]
    rest = float(total - n)
    while free:
        weight = sum(targets[i] for i in free)
        want = {i: rest * (targets[i] / weight if weight > 0 else 1 / len(free)) for i in free}
        full = [i for i in free if want[i] >= room[i]]
        if not full:
            for i in free:
                share[i] = want[i]
            break
        for i in full:
            share[i] = float(room[i])
            rest -= room[i]
        free = [i for i in free if i not in full]
    alloc = [1 + math.floor(s) for s in share]
    left = total - sum(alloc)
    order = sorted(range(n), key=lambda i: (-(share[i] - math.floor(share[i])), i))
    for i in order[:left]:
        alloc[i] += 1
    return alloc


@dataclass(frozen=True)
class Plan:
    """Capacities ``(scales, layers)`` in tokens for one schedule, plus which layers are drafters at each scale.

    ``capacities[k][l]`` is what layer ``l`` retains after scale ``k``; ``drafters[k]`` the drafter layers at scale
    ``k`` (empty where a policy has no drafters); ``budget`` the fraction the plan was made for. ``selection``
    optionally fixes ScaleKV's token-selection settings for the model the plan was calibrated on (``selection``,
    ``grid``, ``kernel``, ``pooling``); a cache built from the plan uses them unless told otherwise.

    ``heads``, where heads of a layer keep different counts: ``heads[k][l]`` one capacity per head (a per-head
    store holds them); ``capacities[k][l]`` is then the layer's mean over its heads, rounded, and ``B`` is the
    exact mean over layers and heads.
    """

    schedule: tuple[tuple[int, int], ...]
    capacities: tuple[tuple[int, ...], ...]
    drafters: tuple[tuple[int, ...], ...]
    budget: float
    model: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    selection: Mapping[str, Any] = field(default_factory=dict)
    heads: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -----------------------------------------------------------------------------------------------
    @property
    def scales(self) -> tuple[Scale, ...]:
        return make_scales(self.schedule)

    @property
    def num_layers(self) -> int:
        return len(self.capacities[0])

    @property
    def num_heads(self) -> int | None:
        """Heads per layer of a per-head plan (None for one count per layer)."""
        return None if self.heads is None else len(self.heads[0][0])

    def held(self, k: int) -> list[int]:
        """Tokens every layer holds at scale ``k`` before compression: what it kept plus the new map."""
        size = self.schedule[k][0] * self.schedule[k][1]
        if k == 0:
            return [size] * self.num_layers
        return [c + size for c in self.capacities[k - 1]]

    def head_held(self, k: int) -> list[tuple[int, ...]]:
        """A per-head plan's tokens every head holds at scale ``k`` before compression."""
        size = self.schedule[k][0] * self.schedule[k][1]
        if k == 0:
            return [(size,) * self.num_heads] * self.num_layers
        return [tuple(c + size for c in row) for row in self.heads[k - 1]]

    def compressed(self, k: int) -> bool:
        """Whether any layer (or head) drops tokens after scale ``k``."""
        if self.heads is not None:
            return any(
                c < h
                for row, held in zip(self.heads[k], self.head_held(k), strict=True)
                for c, h in zip(row, held, strict=True)
            )
        return any(c < h for c, h in zip(self.capacities[k], self.held(k), strict=True))

    @property
    def compressed_scales(self) -> list[int]:
        return [k for k in range(len(self.schedule)) if self.compressed(k)]

    @property
    def average_capacity(self) -> float:
        """``B``: the largest layer-average capacity over the compressed scales, in tokens (the whole prefix when
        nothing is compressed)."""
        if self.heads is not None:
            per = self.num_layers * self.num_heads
            means = [sum(map(sum, self.heads[k])) / per for k in self.compressed_scales]
        else:
            means = [sum(self.capacities[k]) / self.num_layers for k in self.compressed_scales]
        return max(means) if means else float(self.scales[-1].start)

    def check_layout(self, layout: CacheLayout) -> None:
        """Raise unless this plan was made for ``layout``'s schedule and depth."""
        sizes = tuple((s.h, s.w) for s in layout.scales)
        if sizes != self.schedule:
            raise ValueError(
                f"the plan{_named(self.model)} was made for the schedule {_fmt_schedule(self.schedule)}, "
                f"but the model runs {_fmt_schedule(sizes)}"
            )
        if layout.num_layers != self.num_layers:
            raise ValueError(
                f"the plan{_named(self.model)} has {self.num_layers} layers, but the model has {layout.num_layers}"
            )

    def validate(self) -> None:
        """Check shapes and that every capacity is reachable: 1 <= capacity <= held, last scale = held."""
        if not self.schedule:
            raise ValueError("a plan needs at least one scale")
        for k, (h, w) in enumerate(self.schedule):
            if not (_is_int(h) and _is_int(w)) or h < 1 or w < 1:
                raise ValueError(f"scale {k} has size {h!r}x{w!r}; expected positive integer sides")
        if len(self.capacities) != len(self.schedule) or len(self.drafters) != len(self.schedule):
            raise ValueError(
                f"{len(self.schedule)} scales but {len(self.capacities)} capacity rows and "
                f"{len(self.drafters)} drafter rows; expected one of each per scale"
            )
        check_budget(self.budget)
        n = len(self.capacities[0])
        if n < 1:
            raise ValueError("a plan needs at least one layer")
        for k, row in enumerate(self.capacities):
            if len(row) != n:
                raise ValueError(f"scale {k} has {len(row)} capacities; expected one per layer ({n})")
            for layer, c in enumerate(row):
                if not _is_int(c):
                    raise ValueError(f"capacity {c!r} at scale {k}, layer {layer}: expected an integer")
            held = self.held(k)
            for layer, (c, most) in enumerate(zip(row, held, strict=True)):
                if not 1 <= c <= most:
                    raise ValueError(
                        f"capacity {c} at scale {k}, layer {layer}: expected 1..{most} (the tokens it holds there)"
                    )
            if k == len(self.schedule) - 1 and list(row) != held:
                raise ValueError(
                    f"the last scale ({k}) is never compressed: expected capacities {held}, got {list(row)}"
                )
            bad = [d for d in self.drafters[k] if not _is_int(d) or not 0 <= d < n]
            if bad or len(set(self.drafters[k])) != len(self.drafters[k]):
                raise ValueError(
                    f"drafters {list(self.drafters[k])} at scale {k}: expected distinct layers in 0..{n - 1}"
                )
        check_selection(self.selection)
        if self.heads is not None:
            self._validate_heads()

    def _validate_heads(self) -> None:
        if len(self.heads) != len(self.schedule):
            raise ValueError(f"{len(self.schedule)} scales but {len(self.heads)} rows of head capacities")
        width = len(self.heads[0][0]) if self.heads[0] else 0
        if width < 1:
            raise ValueError("head capacities need at least one head per layer")
        for k, row in enumerate(self.heads):
            if len(row) != self.num_layers or any(len(r) != width for r in row):
                raise ValueError(f"scale {k}: expected {self.num_layers} layers x {width} heads of head capacities")
            held = self.head_held(k)
            for layer, (caps, most) in enumerate(zip(row, held, strict=True)):
                for h, (c, m) in enumerate(zip(caps, most, strict=True)):
                    if not _is_int(c) or not 1 <= c <= m:
                        raise ValueError(
                            f"head capacity {c!r} at scale {k}, layer {layer}, head {h}: expected 1..{m} (what it holds)"  # noqa: E501
                        )
                if self.capacities[k][layer] != round(sum(caps) / width):
                    raise ValueError(
                        f"capacity {self.capacities[k][layer]} at scale {k}, layer {layer}: expected the mean of its "
                        f"head capacities, {round(sum(caps) / width)}"
                    )
            if k == len(self.schedule) - 1 and [tuple(r) for r in row] != held:
                raise ValueError(f"the last scale ({k}) is never compressed: expected its head capacities held")

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Our documented JSON form (see the README): one entry per scale with drafter flags and capacities."""
        scales = []
        for k, ((h, w), caps, drafters) in enumerate(zip(self.schedule, self.capacities, self.drafters, strict=True)):
            flags = [1 if layer in drafters else 0 for layer in range(self.num_layers)]
            scales.append({"h": h, "w": w, "drafter": flags, "capacity": list(caps)})
            if self.heads is not None:
                scales[-1]["head_capacity"] = [list(r) for r in self.heads[k]]
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "budget": self.budget,
            "num_layers": self.num_layers,
            "scales": scales,
            **({"selection": dict(self.selection)} if self.selection else {}),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f'expected a JSON object with "format": "{PLAN_FORMAT}"')
        missing = [k for k in ("budget", "num_layers", "scales") if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        scales = data["scales"]
        if not isinstance(scales, list) or not scales:
            raise ValueError('"scales" must be a non-empty list')
        schedule, caps, drafters, heads = [], [], [], []
        for k, entry in enumerate(scales):
            if not isinstance(entry, dict) or not {"h", "w", "drafter", "capacity"} <= entry.keys():
                raise ValueError(f"scale entry {k} must be an object with h, w, drafter and capacity")
            flags, row = entry["drafter"], entry["capacity"]
            if not isinstance(flags, list) or not isinstance(row, list):
                raise ValueError(f"scale entry {k}: drafter and capacity must be lists (one value per layer)")
            if len(flags) != data["num_layers"] or len(row) != data["num_layers"]:
                raise ValueError(
                    f"scale entry {k} has {len(flags)} drafter flags and {len(row)} capacities; "
                    f"expected num_layers = {data['num_layers']} of each"
                )
            if any(f not in (0, 1) or isinstance(f, float) for f in flags):
                raise ValueError(f"scale entry {k}: drafter flags must be 0 or 1, got {flags}")
            schedule.append((entry["h"], entry["w"]))
            caps.append(tuple(row))
            drafters.append(tuple(i for i, f in enumerate(flags) if f))
            per_head = entry.get("head_capacity")
            if per_head is not None:
                if not isinstance(per_head, list) or not all(isinstance(r, list) for r in per_head):
                    raise ValueError(f"scale entry {k}: head_capacity must be a list (layers) of lists (heads)")
                heads.append(tuple(tuple(r) for r in per_head))
        if heads and len(heads) != len(scales):
            raise ValueError("head_capacity must be given for every scale or for none")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ValueError('"provenance" must be an object')
        selection = data.get("selection", {})
        if not isinstance(selection, dict):
            raise ValueError('"selection" must be an object')
        return cls(
            tuple(schedule),
            tuple(caps),
            tuple(drafters),
            data["budget"],
            str(data.get("model", "")),
            provenance,
            selection,
            tuple(heads) if heads else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically (a temporary file renamed into place)."""
        from ..atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _named(model: str) -> str:
    return f" for {model!r}" if model else ""


def _fmt_schedule(sizes: Sequence[tuple[int, int]]) -> str:
    return f"[{', '.join(f'{h}x{w}' for h, w in sizes)}] ({len(sizes)} scales)"


# -- building plans ----------------------------------------------------------------------------------------------
TargetFn = Callable[[int, int, int], list[float]]  # (scale index, compressed-scale counter, B) -> tokens per layer


def build_plan(
    scales: Sequence[Scale],
    num_layers: int,
    budget: float,
    targets: TargetFn,
    drafters: Sequence[Sequence[int]] | None = None,
    *,
    model: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> Plan:
    """Walk the schedule: each scale keeps everything while the layers fit in ``B``, else gives the layers
    :func:`allocate` of ``num_layers * B`` tokens by ``targets``, capped at what each holds."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: expected at least 1")
    avg = average_capacity(budget, scales)
    caps: list[tuple[int, ...]] = []
    held = [0] * num_layers
    j = 0
    for scale in scales:
        held = [c + scale.length for c in (caps[-1] if caps else held)]
        if scale.is_last or sum(held) <= num_layers * avg:
            caps.append(tuple(held))
            continue
        caps.append(tuple(allocate(num_layers * avg, targets(scale.index, j, avg), held)))
        j += 1
    rows = tuple(tuple(sorted(d)) for d in drafters) if drafters is not None else tuple(() for _ in scales)
    return Plan(
        tuple((s.h, s.w) for s in scales), tuple(caps), rows, check_budget(budget), model, dict(provenance or {})
    )


def head_plan(
    scales: Sequence[Scale],
    num_layers: int,
    num_heads: int,
    budget: float,
    targets: Callable[[int, int, int], list[list[float]]],
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Plan:
    """A per-head plan: each scale keeps everything while the layers fit in ``B``; after every later scale but the
    last, the ``num_layers * num_heads * B`` head-tokens are shared by :func:`allocate` over all heads in proportion
    to ``targets(scale index, compressed-scale counter, B)`` (``[layer][head]``), each capped at what it holds. The
    mean over layers and heads is then exactly ``B`` at every compressed scale."""
    if num_layers < 1 or num_heads < 1:
        raise ValueError(f"num_layers={num_layers!r}, num_heads={num_heads!r}: expected at least 1 of each")
    avg = average_capacity(budget, scales)
    rows: list[tuple[tuple[int, ...], ...]] = []
    held = [[0] * num_heads for _ in range(num_layers)]
    j = 0
    for scale in scales:
        held = [[c + scale.length for c in r] for r in (rows[-1] if rows else held)]
        flat = [c for r in held for c in r]
        if scale.is_last or sum(flat) <= num_layers * num_heads * avg:
            rows.append(tuple(tuple(r) for r in held))
            continue
        want = [t for r in targets(scale.index, j, avg) for t in r]
        got = allocate(num_layers * num_heads * avg, want, flat)
        rows.append(tuple(tuple(got[l * num_heads : (l + 1) * num_heads]) for l in range(num_layers)))
        j += 1
    return plan_from_heads(scales, rows, budget, provenance=provenance)


def plan_from_heads(
    scales: Sequence[Scale],
    heads: Sequence[Sequence[Sequence[int]]],
    budget: float,
    *,
    model: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> Plan:
    """The :class:`Plan` of per-head capacities ``heads[scale][layer][head]`` (layer capacities: their means)."""
    heads = tuple(tuple(tuple(int(c) for c in r) for r in row) for row in heads)
    caps = tuple(tuple(round(sum(r) / len(r)) for r in row) for row in heads)
    empty = tuple(() for _ in scales)
    return Plan(
        tuple((s.h, s.w) for s in scales),
        caps,
        empty,
        check_budget(budget),
        model,
        dict(provenance or {}),
        {},
        heads,
    )


def first_compressed_scale(scales: Sequence[Scale], avg: int) -> int | None:
    """Index of the first scale after which a layer of average capacity ``avg`` must drop tokens (SPEC §4)."""
    for s in scales[:-1]:
        if s.end > avg:
            return s.index
    return None


def uniform_plan(scales: Sequence[Scale], num_layers: int, budget: float) -> Plan:
    """Every layer keeps ``B`` tokens (sliding window, StreamingLLM, SnapKV, H2O, random)."""
    return build_plan(scales, num_layers, budget, lambda k, j, avg: [1.0] * num_layers, provenance={"rule": "uniform"})


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 1:
        raise ValueError(f"beta={beta!r}: expected a number >= 1 (the deepest layer keeps B / beta)")
    return float(beta)


def pyramid_plan(scales: Sequence[Scale], num_layers: int, budget: float, beta: float = 20.0) -> Plan:
    """PyramidKV: capacity decreasing linearly with depth from ``2B - B/beta`` (first layer) to ``B/beta`` (last),
    mean ``B`` (PyramidKV's arithmetic schedule; ``beta = 20`` is its default)."""
    check_beta(beta)

    def targets(k: int, j: int, avg: int) -> list[float]:
        low, high = avg / beta, 2 * avg - avg / beta
        if num_layers == 1:
            return [float(avg)]
        return [high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]

    return build_plan(scales, num_layers, budget, targets, provenance={"rule": "pyramid", "beta": beta})


def check_refiner_schedule(
    start: float, end: float, start_name: str = "refiner_start", end_name: str = "refiner_end"
) -> None:
    """Refiner capacities of :func:`rule_plan`, as fractions of B: both in (0, 1], ``end <= start``."""

    def label(name: str, value: Any) -> str:
        return f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"

    for name, value in ((start_name, start), (end_name, end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{label(name, value)}: expected a fraction of B in (0, 1]")
        if not 0 < value <= 1:
            raise ValueError(f"{label(name, value)}: expected a fraction of B in (0, 1]")
    if end > start:
        raise ValueError(f"{label(end_name, end)} > {label(start_name, start)}: refiners must not grow")


def rule_plan(
    scales: Sequence[Scale],
    num_layers: int,
    budget: float,
    drafters: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    refiner_start: float = PAPER_REFINER_START,
    refiner_end: float = PAPER_REFINER_END,
    model: str = "",
) -> Plan:
    """The ScaleKV rule (SPEC §4) for an explicit drafter list.

    ``drafters``: layer indices that are drafters at every compressed scale, or a mapping scale index -> layers.
    At the ``j``-th of ``n`` compressed scales refiners target ``B * (refiner_start + (refiner_end - refiner_start)
    * j / (n - 1))`` tokens; drafters share what remains of ``num_layers * B``, so the layer mean is ``B``; nobody is
    given more than it holds, and what a capped drafter cannot take goes back to the refiners. A scale without
    drafters is uniform. The defaults are the paper's 2B/10% setting (``B_r(0) = 600``, ``delta = 70``, ``B = 650``).
    """
    check_refiner_schedule(refiner_start, refiner_end)
    avg = average_capacity(budget, scales)
    first = first_compressed_scale(scales, avg)
    compressed = [] if first is None else list(range(first, len(scales) - 1))
    if isinstance(drafters, Mapping):
        unknown = sorted(set(drafters) - set(range(len(scales))))
        if unknown:
            raise ValueError(f"drafters given for scales {unknown}; expected scale indices in 0..{len(scales) - 1}")
        given = {k: list(v) for k, v in drafters.items()}
        per_scale = {k: given.get(k, []) for k in compressed}
    else:
        given = {}
        per_scale = {k: list(drafters) for k in compressed}
    for k, layers in {**given, **per_scale}.items():
        bad = [d for d in layers if not _is_int(d) or not 0 <= d < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"drafters {layers} at scale {k}: expected distinct layer indices in 0..{num_layers - 1}")
        if len(layers) == num_layers:
            raise ValueError(f"every layer is a drafter at scale {k}: expected at least one refiner")

    def targets(k: int, j: int, avg: int) -> list[float]:
        layers = per_scale[k]
        if not layers:
            return [float(avg)] * num_layers
        frac = (
            refiner_start
            if len(compressed) == 1
            else (refiner_start + (refiner_end - refiner_start) * j / (len(compressed) - 1))
        )
        refiner = avg * frac
        drafter = (num_layers * avg - (num_layers - len(layers)) * refiner) / len(layers)
        return [drafter if layer in layers else refiner for layer in range(num_layers)]

    rows = [tuple(per_scale.get(k, given.get(k, ()))) for k in range(len(scales))]  # roles are kept where given
    provenance = {
        "rule": "scalekv-linear",
        "refiner_start": refiner_start,
        "refiner_end": refiner_end,
        "source": "explicit drafter list (SPEC §4 rule; no calibration)",
    }
    return build_plan(scales, num_layers, budget, targets, rows, model=model, provenance=provenance)


# -- reading files -----------------------------------------------------------------------------------------------
def load_plan(path: str | Path, budget: float | None = None) -> Plan:
    """Read a plan file: our JSON format, or a released ScaleKV budget file (``"Scale N"`` keys).

    Released files carry no schedule or budget: they were made for Infinity 1024x1024 (:data:`INFINITY_1M_SQUARE`);
    their budget is ``budget`` if given, else their layer average over the prefix rounded to a whole percent
    (650 / 6425 -> 0.10). Any problem raises ValueError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"plan file {str(path)!r} is a folder: expected a plan JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"plan file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
    try:
        if isinstance(data, dict) and any(isinstance(k, str) and k.startswith("Scale ") for k in data):
            plan = released_plan(data, budget=budget, model=path.stem)
        else:
            plan = Plan.from_dict(data)
    except ValueError as e:
        raise ValueError(f"plan file {str(path)!r} is malformed: {e}") from None
    try:
        check_labels(plan)
    except ValueError as e:
        raise ValueError(f"plan file {str(path)!r} is mislabelled: {e}") from None
    return plan


def check_labels(plan: Plan) -> None:
    """Refuse a plan whose labels disagree with its capacities.

    ``budget`` must give the plan's B (:attr:`Plan.average_capacity`) to within rounding and half a percentage point
    of the prefix (the released files label their budgets in whole percent: 650 of 6425 tokens is 10%). A ``model``
    naming a VAR preset must have its depth and schedule, one naming an Infinity preset its depth (its schedule
    depends on the image size); other labels (``demo``, a file name) name no fixed architecture."""
    prefix = plan.scales[-1].start
    labelled = plan.budget * prefix
    if abs(plan.average_capacity - labelled) > 0.5 + 0.005 * prefix:
        raise ValueError(
            f"budget {plan.budget:g} means B = {labelled:.4g} tokens per layer of the {prefix}-token prefix, but the "
            f"capacities keep B = {plan.average_capacity:g} (budget {plan.average_capacity / prefix:.3g}); "
            "expected a budget label that matches the capacities"
        )
    from ..hub import MODELS  # the registry: a label that names a model with a fixed architecture

    entry = MODELS.get(plan.model)
    cfg = entry.preset if entry is not None else None
    if cfg is None:
        return
    if entry.family == "var":
        schedule = tuple((p, p) for p in cfg.patch_nums)
        if plan.schedule != schedule or plan.num_layers != cfg.depth:
            raise ValueError(
                f"model {plan.model!r} has {cfg.depth} layers and the schedule {_fmt_schedule(schedule)}, but the "
                f"capacities are for {plan.num_layers} layers and {_fmt_schedule(plan.schedule)}"
            )
    elif plan.num_layers != cfg.depth:
        raise ValueError(
            f"model {plan.model!r} has {cfg.depth} layers, but the capacities are for {plan.num_layers} layers"
        )


def released_plan(data: Mapping[str, Any], budget: float | None = None, model: str = "") -> Plan:
    """The released format: ``"Scale N"`` applies after the scale with 0-based index ``N - 2``; ``"Block i": 1``
    marks drafters, which keep ``"Max"`` tokens; refiners keep ``"Min"``; ``"High"`` counts the drafters."""
    schedule = INFINITY_1M_SQUARE
    scales = make_scales(schedule)
    entries: dict[int, tuple[tuple[int, ...], list[int]]] = {}
    num_layers = None
    for key, entry in data.items():
        try:
            n = int(key.removeprefix("Scale "))
        except ValueError:
            raise ValueError(f'key {key!r}: expected "Scale N"') from None
        k = n - 2
        if not 0 <= k < len(schedule) - 1:
            raise ValueError(f"key {key!r} names scale index {k}; expected 0..{len(schedule) - 2} (never the last)")
        if not isinstance(entry, dict) or not {"Max", "Min", "High"} <= entry.keys():
            raise ValueError(f"{key!r} must be an object with Max, Min, High and Block i flags")
        blocks = {int(b.removeprefix("Block ")): f for b, f in entry.items() if b.startswith("Block ")}
        if sorted(blocks) != list(range(len(blocks))) or not blocks:
            raise ValueError(f'{key!r}: expected flags "Block 0" .. "Block L-1", got blocks {sorted(blocks)}')
        if num_layers is None:
            num_layers = len(blocks)
        if len(blocks) != num_layers:
            raise ValueError(f"{key!r} has {len(blocks)} blocks; the other scales have {num_layers}")
        if any(f not in (0, 1) for f in blocks.values()):
            raise ValueError(f"{key!r}: block flags must be 0 or 1")
        drafters = tuple(i for i in sorted(blocks) if blocks[i] == 1)
        if entry["High"] != len(drafters):
            raise ValueError(f"{key!r}: High = {entry['High']!r} but {len(drafters)} blocks are flagged 1")
        for name in ("Max", "Min"):
            if not _is_int(entry[name]):
                raise ValueError(f"{key!r}: {name} = {entry[name]!r}, expected an integer")
        entries[k] = (drafters, [entry["Max"] if i in drafters else entry["Min"] for i in range(num_layers)])
    if not entries:
        raise ValueError('no "Scale N" entries')
    first = min(entries)
    if sorted(entries) != list(range(first, len(schedule) - 1)):
        raise ValueError(
            f"entries cover scale indices {sorted(entries)}; expected every one from {first} to {len(schedule) - 2}"
        )
    caps: list[tuple[int, ...]] = []
    drafters: list[tuple[int, ...]] = []
    for s in scales:
        if s.index in entries:
            d, row = entries[s.index]
            caps.append(tuple(row))
            drafters.append(d)
        else:
            prev = caps[-1] if caps else (0,) * num_layers
            caps.append(tuple(c + s.length for c in prev))
            drafters.append(())
    mean = sum(caps[first]) / num_layers
    label = budget if budget is not None else round(mean / scales[-1].start, 2)
    provenance = {"source": "released ScaleKV budget file", "schedule": "Infinity 1024x1024 (1M, 1:1)"}
    return Plan(schedule, tuple(caps), tuple(drafters), check_budget(label), model, provenance)
