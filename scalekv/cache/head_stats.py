"""Per-head attention statistics of a model, measured once offline, that the head-aware policies read.

One file (``scalekv-head-stats/1`` JSON, written by ``scalekv calibrate --method hack|heatkv|ams_kv``) holds, for one
model and schedule:

* ``sigma`` ``[layer][head]``: HACK's column variance, the sum over keys of the variance over the last scale's
  queries of their attention probability (PEERS §2.2a), averaged over the calibration images;
* ``scas`` ``[layer][head][scale]``: HeatKV's S-CAS, the attention mass the later scales' queries give to each
  source scale's keys, averaged over queries, images and the source's later scales (PEERS §5.1; zero for the last
  scale, which no later scale reads);
* ``similarity`` ``[layer]``: AMS-KV's inter-scale key similarity, the negative mean L2 distance between each
  scale's keys and the previous scale's keys interpolated onto its grid (PEERS §3.2), over heads, tokens, images and
  adjacent scale pairs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAD_STATS_FORMAT = "scalekv-head-stats/1"


@dataclass(frozen=True)
class HeadStats:
    schedule: tuple[tuple[int, int], ...]
    sigma: tuple[tuple[float, ...], ...]
    scas: tuple[tuple[tuple[float, ...], ...], ...]
    similarity: tuple[float, ...]
    model: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers, heads, scales = len(self.sigma), len(self.sigma[0]) if self.sigma else 0, len(self.schedule)
        if layers < 1 or heads < 1:
            raise ValueError("head statistics need at least one layer and one head")
        if any(len(r) != heads for r in self.sigma):
            raise ValueError(f"sigma: expected {layers} layers x {heads} heads")
        if len(self.scas) != layers or any(len(r) != heads or any(len(c) != scales for c in r) for r in self.scas):
            raise ValueError(f"scas: expected {layers} layers x {heads} heads x {scales} scales")
        if len(self.similarity) != layers:
            raise ValueError(f"similarity: expected {layers} values (one per layer), got {len(self.similarity)}")

    @property
    def num_layers(self) -> int:
        return len(self.sigma)

    @property
    def num_heads(self) -> int:
        return len(self.sigma[0])

    def check_layout(self, layout, *, schedule: bool = False) -> None:
        """Raise unless these statistics are for ``layout``'s depth and heads (and its schedule, if asked)."""
        if (layout.num_layers, layout.num_heads) != (self.num_layers, self.num_heads):
            raise ValueError(
                f"the head statistics{_named(self.model)} are for {self.num_layers} layers x {self.num_heads} heads, "
                f"but the model has {layout.num_layers} x {layout.num_heads}"
            )
        sizes = tuple((s.h, s.w) for s in layout.scales)
        if schedule and sizes != self.schedule:
            raise ValueError(
                f"the head statistics{_named(self.model)} were measured on the schedule {list(self.schedule)}, but "
                f"the model runs {list(sizes)}: calibrate on this schedule"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HEAD_STATS_FORMAT,
            "model": self.model,
            "schedule": [list(s) for s in self.schedule],
            "sigma": [list(r) for r in self.sigma],
            "scas": [[list(c) for c in r] for r in self.scas],
            "similarity": list(self.similarity),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any) -> HeadStats:
        if not isinstance(data, dict) or data.get("format") != HEAD_STATS_FORMAT:
            raise ValueError(f'expected a JSON object with "format": "{HEAD_STATS_FORMAT}"')
        missing = [k for k in ("schedule", "sigma", "scas", "similarity") if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        try:
            return cls(
                tuple((int(h), int(w)) for h, w in data["schedule"]),
                tuple(tuple(float(x) for x in r) for r in data["sigma"]),
                tuple(tuple(tuple(float(x) for x in c) for c in r) for r in data["scas"]),
                tuple(float(x) for x in data["similarity"]),
                str(data.get("model", "")),
                dict(data.get("provenance", {})),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed head statistics: {e}") from None

    def save(self, path: str | Path) -> Path:
        from ..atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def load_head_stats(source: HeadStats | str | Path) -> HeadStats:
    """A :class:`HeadStats` or the path of its JSON file; any problem raises ValueError naming the file."""
    if isinstance(source, HeadStats):
        return source
    if not isinstance(source, (str, Path)):
        raise ValueError(f"calibration={source!r}: expected HeadStats or the path of a head-statistics JSON file")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"calibration file {str(path)!r} does not exist (make one with scalekv calibrate --method)")
    try:
        return HeadStats.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"calibration file {str(path)!r} is malformed: {e}") from None


def check_fraction(name: str, value: float, *, low_open: bool = True, high_open: bool = True) -> float:
    """A real number strictly inside (0, 1) (or with closed ends where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r}: expected a fraction in {lo}0, 1{hi}")
    return float(value)


def check_pairs(name: str, pairs: Sequence, width: int) -> list[tuple[int, ...]]:
    """A list of integer tuples of ``width`` (e.g. ``[[layer, head], ...]``), or a ValueError naming it."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise ValueError(f"{name}={pairs!r}: expected a list such as {[[0] * width]}")
    out = []
    for p in pairs:
        p = (p,) if width == 1 and not isinstance(p, Sequence) else p
        if (
            isinstance(p, (str, bytes))
            or not isinstance(p, Sequence)
            or len(p) != width
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in p)
        ):
            raise ValueError(f"{name}={list(pairs)!r}: expected entries of {width} non-negative integers, got {p!r}")
        out.append(tuple(p))
    return out


def _named(model: str) -> str:
    return f" for {model!r}" if model else ""
