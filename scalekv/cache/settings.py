"""The settings a cache policy and a plan's ``selection`` block take, and their checks: plain values, no tensors,
so that plans (plain data) and policies both read them from here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_pooling(pooling: str, kernel: int) -> None:
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling={pooling!r}: expected 'avg' or 'max'")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel!r}: expected an odd integer >= 1")


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    return value


SELECTIONS = ("spec", "release")
SCORINGS = ("mass", "logits")  # softmax attention mass (SPEC §5) or summed raw logits (the release)


def check_selection_mode(selection: str) -> str:
    """ScaleKV's ``selection``: 'spec' (SPEC §5) or 'release' (the published code's choice); returns it."""
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: expected one of {', '.join(map(repr, SELECTIONS))}")
    return selection


def check_scoring(scoring: str, selection: str = "spec") -> str:
    """ScaleKV's ``scoring``: 'mass' or 'logits' under the 'spec' selection; the 'release' selection scores by
    logits only. Returns it."""
    if not isinstance(scoring, str) or scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}: expected one of {', '.join(map(repr, SCORINGS))}")
    if selection == "release" and scoring != "logits":
        raise ValueError(f"scoring={scoring!r} with selection='release': the release scores by raw logits only")
    return scoring


def check_keep_window(keep_window: bool, selection: str = "spec") -> bool:
    """ScaleKV's ``keep_window``: whether the observation window is always kept (SPEC §5, and always under the
    'release' selection) or only scores the other tokens and competes with them. Returns it."""
    if not isinstance(keep_window, bool):
        raise ValueError(f"keep_window={keep_window!r}: expected True or False")
    if selection == "release" and not keep_window:
        raise ValueError("keep_window=False with selection='release': the release always keeps its window")
    return keep_window


SELECTION_KEYS = ("selection", "grid", "kernel", "pooling", "scoring", "keep_window")


def check_selection(selection: Mapping[str, Any]) -> None:
    """A plan's selection settings: a subset of selection ('spec' or 'release'), grid (int >= 1), kernel (odd int
    >= 1), pooling ('avg' or 'max'), scoring ('mass' or 'logits'; 'logits' only under 'release'), keep_window (a
    bool; True only under 'release')."""
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise ValueError(f"selection keys {unknown}: expected some of {list(SELECTION_KEYS)}")
    if "selection" in selection:
        check_selection_mode(selection["selection"])
    if "scoring" in selection:
        check_scoring(selection["scoring"], selection.get("selection", "spec"))
    if "keep_window" in selection:
        check_keep_window(selection["keep_window"], selection.get("selection", "spec"))
    if "grid" in selection:
        positive_int("grid", selection["grid"])
    check_pooling(selection.get("pooling", "avg"), selection.get("kernel", 1))
