"""Checks a ``scalekv_release_selection`` fixture directory as its README specifies: ScaleKV with
``selection='release'`` keeps exactly the cache positions the published ScaleKV code kept, per (row, head), given
the same queries and keys; where a tie straddles the cut, any valid top set of the release's scores; and where the
fixture stores them, the gathered K and V bit for bit.

The selection is driven through the cache's public protocol: a layout whose one layer holds the case's history as
an uncompressed first scale, then the case's map as the second; ``update`` and ``compress`` at both, then the
kept positions are read back from the values, which carry their own position numbers."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from scalekv.cache import CacheLayout, Plan, make_cache, make_scales
from scalekv.cache.scalekv import release_window

MODEL_PREFIX = "scalekv_release_selection"  # the fixture's "fixture" field


@cache
def _config(fixture: Path) -> dict:
    return json.loads((fixture / "config.json").read_text())


@cache
def _tensors(fixture: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixture / "cases.safetensors"))


def run_release(case: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V the ScaleKV cache (``selection='release'``) holds after compressing the case's layer at its scale,
    ``(rows, heads, capacity, D)`` each."""
    rows, heads, held, dim = k.shape
    side, capacity, n = case["side"], case["capacity"], q.shape[2]
    assert n == side * side == case["scale_tokens"] and held == case["held"], case["id"]
    history = held - n
    schedule = ((1, history), (side, side), (1, 1))  # the history as one uncompressed scale, then the case's map
    plan = Plan(schedule, ((history,), (capacity,), (capacity + 1,)), ((), (), ()), budget=0.5)
    layout = CacheLayout(1, heads, dim, make_scales(schedule), rows, rows // 2, softmax_scale=1 / math.sqrt(dim))
    policy = make_cache(
        "scalekv", plan=plan, selection="release", grid=case["grid"], kernel=case["kernel"], pooling="max"
    )
    assert case["window_size"] == case["grid"] ** 2 and case["pooling"] == "maxpool", case["id"]
    policy.reset(layout)
    first, current = layout.scales[0], layout.scales[1]
    policy.update(0, first, torch.zeros_like(k[:, :, :history]), k[:, :, :history], v[:, :, :history])
    policy.compress(0, first, torch.zeros_like(k[:, :, :history]))
    assert policy.layers[0].length == history, "the history scale must stay whole"
    policy.update(0, current, q, k[:, :, history:], v[:, :, history:])
    policy.compress(0, current, q)
    store = policy.layers[0]
    assert store.length == capacity, f"{case['id']}: holds {store.length} tokens, planned {capacity}"
    return store.k, store.v


def kept_positions(case: dict, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(rows, heads, capacity)`` int64: the positions kept, read from values that hold their position number."""
    rows, heads, held, dim = k.shape
    # float32 whatever the keys' dtype: exact position numbers (the store does not tie V's dtype to K's)
    numbers = torch.arange(held, dtype=torch.float32).view(1, 1, held, 1).expand(rows, heads, held, dim)
    _, v = run_release(case, q, k, numbers.contiguous())
    assert bool((v == v[..., :1]).all())
    return v[..., 0].round().long()


def check_case(fixture: Path, case: dict) -> None:
    cs, name = _tensors(fixture), case["id"]
    q, k, v, ref = (cs[f"{name}.{t}"] for t in ("q", "k", "v", "kept_idx"))
    window = release_window(case["side"], case["side"], case["grid"]) + case["current_scale_start"]
    assert window.tolist() == case["window_positions_for_debugging"], f"{name}: window differs"
    kept = kept_positions(case, q, k)
    assert kept.shape == ref.shape == (case["rows"], case["heads"], case["capacity"]), name
    if case["exact_match_required"]:
        bad = (kept != ref).any(-1).nonzero().tolist()
        assert not bad, f"{name}: kept positions differ from the release's at (row, head) {bad}"
    else:
        check_valid_top_set(case, kept, ref, cs[f"{name}.scores"], window)
    if f"{name}.k_kept" in cs:
        k_out, v_out = run_release(case, q, k, v)
        assert k_out.dtype == k.dtype and torch.equal(k_out, cs[f"{name}.k_kept"]), f"{name}: K differs"
        assert v_out.dtype == v.dtype and torch.equal(v_out, cs[f"{name}.v_kept"]), f"{name}: V differs"


def check_valid_top_set(
    case: dict, kept: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, window: torch.Tensor
) -> None:
    """A tie straddles the cut: ours must be a top set of the release's ``scores`` that keeps as many of the tied
    positions as the release did, and may differ from the release's set only at those positions."""
    name = case["id"]
    for cut in case["cut"]:
        r, h = cut["row"], cut["head"]
        mine, theirs, s = kept[r, h], ref[r, h], scores[r, h]
        where = f"{name} row {r} head {h}"
        assert bool((mine[1:] > mine[:-1]).all()), f"{where}: positions not distinct and ascending"
        assert bool(torch.isin(window, mine).all()), f"{where}: a window position was dropped"
        free = torch.ones_like(s, dtype=torch.bool)
        free[window] = False
        is_kept = torch.zeros_like(free)
        is_kept[mine] = True
        cut_score = s.new_tensor(cut["cut_score"])
        assert bool(is_kept[free & (s > cut_score)].all()), f"{where}: a position above the cut was dropped"
        assert not bool(is_kept[free & (s < cut_score)].any()), f"{where}: a position below the cut was kept"
        tied = (free & (s == cut_score)).nonzero().flatten()
        assert len(tied) == cut["n_equal"], f"{where}: {len(tied)} positions at the cut score, fixture says {cut}"
        if cut["tied_positions"]:
            assert tied.tolist() == cut["tied_positions"], where
        assert int(is_kept[tied].sum()) == cut["n_equal_kept"], f"{where}: keeps a different number of tied positions"
        differ = set(mine.tolist()) ^ set(theirs.tolist())
        assert differ <= set(tied.tolist()), f"{where}: differs from the release away from the tie: {sorted(differ)}"


def cases(fixture: Path) -> dict[str, callable]:
    """One check per case of the fixture, by case id."""
    return {c["id"]: (lambda c=c: check_case(fixture, c)) for c in _config(fixture)["cases"]}
