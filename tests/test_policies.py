"""Every registered cache policy against the same matrix of behaviours (adding a policy adds one line to CASES)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalekv.cache import POLICIES, CacheLayout, KVCache, Plan, make_cache, make_scales, rule_plan
from scalekv.cache.plan import PLANS_DIR, average_capacity, first_compressed_scale
from scalekv.cache.policy import keep_top
from scalekv.cache.scalekv import grid_window, release_keep, release_window
from scalekv.cache.store import CHUNK_TOKENS
from scalekv.cli import main

from .helpers import tiny_pipeline

RELEASED_2B = PLANS_DIR / "infinity_2b_10pct.json"


@dataclass(frozen=True)
class Case:
    kwargs: dict = field(default_factory=dict)  # what the policy needs beyond budget
    data_dependent: bool = True  # its choice depends on the keys/queries (not only on positions)


CASES: dict[str, Case] = {
    "full": Case(data_dependent=False),
    "sliding_window": Case(data_dependent=False),
    "streaming_llm": Case({"sinks": 2}, data_dependent=False),
    "snapkv": Case(),
    "pyramidkv": Case(),
    "h2o": Case(),
    "random": Case({"seed": 3}),
    "scalekv": Case({"drafters": [0]}),
    "hack": Case({"contextual": [[0, 0]]}),
    "ams_kv": Case({"demanding": [0]}, data_dependent=False),
    "heatkv": Case({"seed": 0}, data_dependent=False),
}
COMPRESSING = [name for name in CASES if POLICIES[name].compresses]
BUDGETS = [0.3, 0.1, 0.01]  # 0.01 keeps one token per layer: below every observation window

# a synthetic schedule: non-square maps, maps smaller than the 4x4 window grid, a single-row map
ODD_SIZES = [(1, 1), (2, 3), (3, 2), (1, 5), (5, 7), (4, 4)]


def build(name: str, budget: float) -> KVCache:
    return make_cache(name, budget=budget, **CASES[name].kwargs)


def layout(rows: int = 2, sizes=ODD_SIZES, layers: int = 3, heads: int = 2, head_dim: int = 8) -> CacheLayout:
    return CacheLayout(layers, heads, head_dim, make_scales(sizes), rows, rows // 2 or 1)


def drive(cache: KVCache, lay: CacheLayout, data: dict[str, torch.Tensor]) -> list[dict]:
    """Run the attention-side protocol over every scale and layer with given q/k/v ``(rows, heads, total, D)``,
    checking each selection; returns one record per compression: layer, scale, capacity, kept indices."""
    cache.reset(lay)
    records = []
    select = cache.select

    def spy(layer, scale, q, store, capacity):
        index = select(layer, scale, q, store, capacity)
        records.append(
            {
                "layer": layer,
                "scale": scale.index,
                "capacity": capacity,
                "length": store.length,
                "lengths": getattr(store, "lengths", [store.length] * lay.num_heads),
                "index": index,
                "k": [x.clone() for x in head_views(store, "k")] if hasattr(store, "heads") else store.k.clone(),
                "heads_k": [x.clone() for x in head_views(store, "k")],
                "heads_v": [x.clone() for x in head_views(store, "v")],
            }
        )
        return index

    cache.select = spy
    for scale in lay.scales:
        part = slice(scale.start, scale.end)
        for layer in range(lay.num_layers):
            q, k, v = (data[n][:, :, part] + layer for n in ("q", "k", "v"))
            cache.attend(layer, scale, q, k, v)
            n_before = len(records)
            cache.compress(layer, scale, q)
            if len(records) > n_before:  # the store now holds exactly the selected tokens
                r = records[-1]
                store = cache.layers[layer]
                for h, idx in enumerate(per_head(r["index"])):
                    gather = idx.unsqueeze(-1).expand(-1, -1, lay.head_dim)
                    assert torch.equal(head_views(store, "k")[h], r["heads_k"][h].gather(1, gather))
                    assert torch.equal(head_views(store, "v")[h], r["heads_v"][h].gather(1, gather))
    del cache.select
    return records


def head_views(store, which: str) -> list[torch.Tensor]:
    """Every head's keys or values ``(rows, L_h, D)``, on a per-layer or a per-head store."""
    if hasattr(store, "heads"):
        return [getattr(h, which)[:, 0] for h in store.heads]
    t = getattr(store, which)
    return [t[:, h] for h in range(t.shape[1])]


def per_head(index) -> list[torch.Tensor]:
    """A selection as one ``(rows, m_h)`` tensor per head (from ``(rows, heads, m)`` or a per-head list)."""
    return list(index) if isinstance(index, (list, tuple)) else [index[:, h] for h in range(index.shape[1])]


def same_rows(a, b, row_a: int | slice, row_b: int | slice | None = None) -> bool:
    row_b = row_a if row_b is None else row_b
    return all(torch.equal(x[row_a], y[row_b]) for x, y in zip(per_head(a), per_head(b), strict=True))


def random_data(lay: CacheLayout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (lay.rows, lay.num_heads, lay.total_tokens, lay.head_dim)
    return {n: torch.randn(shape, generator=g) for n in ("q", "k", "v")}


def test_matrix_covers_every_registered_policy():
    assert set(CASES) == set(POLICIES)


# -- generation with the tiny VAR ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(depth=4)


@pytest.fixture(scope="module")
def full_run(pipe):
    return pipe.generate([1, 7], seed=11, cfg=2.0, top_k=20, top_p=0.9)


@pytest.mark.parametrize("name", list(CASES))
def test_budget_one_is_bit_identical_to_the_full_cache(pipe, full_run, name):
    cache = build(name, 1.0)
    gen = pipe.generate([1, 7], seed=11, cfg=2.0, top_k=20, top_p=0.9, cache=cache)
    assert torch.equal(gen.tokens, full_run.tokens)
    assert torch.equal(gen.images, full_run.images)
    assert gen.kv_bytes_peak == full_run.kv_bytes_peak < gen.kv_bytes_reference
    assert gen.kv_bytes_history == full_run.kv_bytes_history


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", COMPRESSING)
def test_generation_retains_exactly_the_planned_capacity(pipe, name, budget):
    cache = build(name, budget)
    gen = pipe.generate([1, 7], seed=11, cfg=2.0, top_k=20, top_p=0.9, cache=cache)
    lay = cache.layout
    avg = average_capacity(budget, lay.scales)
    assert avg == round(budget * (lay.scales[-1].start))
    first = first_compressed_scale(lay.scales, avg)
    heads = cache.plan.heads  # per-head capacities: a layer's tokens are the mean over its heads
    caps = cache.plan.capacities if heads is None else [[sum(r) / len(r) for r in row] for row in heads]
    per_token = 2 * lay.rows * lay.num_heads * lay.head_dim * 4  # K and V, float32
    for scale, rec in zip(lay.scales, gen.scales, strict=True):
        if scale.is_last:  # the last map is attended over and dropped: nothing is stored after it
            assert rec.cache_lengths == cache.scale_lengths[scale.index] == [0] * lay.num_layers
            assert rec.kv_bytes == 0 and cache.scale_nbytes[scale.index] == [0] * lay.num_layers
            continue
        assert rec.cache_lengths == list(caps[scale.index]) == cache.scale_lengths[scale.index]
        assert cache.scale_nbytes[scale.index] == [n * per_token for n in caps[scale.index]]
        assert rec.kv_bytes == sum(caps[scale.index]) * per_token
        if scale.index >= first:
            assert abs(sum(rec.cache_lengths) / lay.num_layers - avg) <= 1
        else:
            assert rec.cache_lengths == [scale.end] * lay.num_layers
    assert cache.compress_seconds > 0
    assert gen.kv_bytes_history == sum(caps[-2]) * per_token
    if heads is None:
        peak = expected_peak(caps, lay)
    else:  # one arena per head, each sized from that head's capacities
        peak = sum(expected_peak([[r[h] for r in row] for row in heads], lay) for h in range(lay.num_heads))
        peak /= lay.num_heads
    assert gen.kv_bytes_peak == peak * per_token < gen.kv_bytes_reference
    assert gen.kv_bytes_reference == lay.num_layers * lay.total_tokens * per_token


def expected_peak(caps, lay: CacheLayout) -> int:
    """Token-equivalents alive at the fullest moment, recounted from the plan: layer l of scale k attends over its
    history and map, layers before it already hold what they keep after scale k (nothing after the last scale),
    layers after it still hold what scale k-1 left; plus one copy chunk of K or V (half a token each)."""
    peak, before = 0, [0] * lay.num_layers
    for scale in lay.scales:
        after = [0] * lay.num_layers if scale.is_last else list(caps[scale.index])
        for layer in range(lay.num_layers):
            held = sum(after[:layer]) + before[layer] + scale.length + sum(before[layer + 1 :])
            peak = max(peak, held)
        before = after
    return peak + min(CHUNK_TOKENS, peak) / 2


@pytest.mark.parametrize("name", list(CASES))
def test_no_state_survives_between_generations(pipe, name):
    cache = build(name, 0.2 if POLICIES[name].compresses else 1.0)
    a = pipe.generate([2, 5], seed=4, top_k=20, cache=cache)
    other = pipe.generate([9], seed=8, top_k=20, cache=cache)  # different rows in between
    b = pipe.generate([2, 5], seed=4, top_k=20, cache=cache)
    fresh = pipe.generate([2, 5], seed=4, top_k=20, cache=build(name, 0.2 if POLICIES[name].compresses else 1.0))
    assert other.images.shape[0] == 1
    for run in (b, fresh):
        assert torch.equal(a.images, run.images)
        assert [r.cache_lengths for r in a.scales] == [r.cache_lengths for r in run.scales]
        assert a.kv_bytes_peak == run.kv_bytes_peak


# -- the protocol on an odd schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", COMPRESSING)
def test_selection_on_non_square_and_tiny_maps(name, budget):
    lay = layout()
    cache = build(name, budget)
    records = drive(cache, lay, random_data(lay))
    assert records, "a budget below 1 must compress"
    plan = cache.plan
    caps = plan.capacities if plan.heads is None else [[sum(r) / len(r) for r in row] for row in plan.heads]
    for r in records:
        planned = plan.heads[r["scale"]][r["layer"]] if plan.heads is not None else caps[r["scale"]][r["layer"]]
        assert r["capacity"] == planned
        head_caps = r["capacity"] if isinstance(r["capacity"], tuple) else (r["capacity"],) * lay.num_heads
        assert sum(head_caps) < sum(r["lengths"])
        if not isinstance(r["capacity"], tuple):
            assert r["index"].shape == (lay.rows, lay.num_heads, r["capacity"])
        for h, index in enumerate(per_head(r["index"])):
            assert index.shape == (lay.rows, min(head_caps[h], r["lengths"][h])) and index.dtype == torch.int64
            assert bool((index[..., 1:] > index[..., :-1]).all()), "indices must be strictly increasing"
            assert int(index.min()) >= 0 and int(index.max()) < r["lengths"][h]
    assert all(r["scale"] != len(lay.scales) - 1 for r in records), "the last scale is never compressed"
    assert [s.length for s in cache.layers] == [0] * lay.num_layers  # and its keys are dropped
    assert cache.scale_lengths[-2] == list(caps[-2])


@pytest.mark.parametrize("name", COMPRESSING)
def test_cfg_rows_select_independently(name):
    lay = layout(rows=2)
    base = random_data(lay, seed=1)
    changed = {n: t.clone() for n, t in base.items()}
    for t in changed.values():
        t[1] = torch.randn(t[1].shape, generator=torch.Generator().manual_seed(9))
    a = drive(build(name, 0.2), lay, base)
    b = drive(build(name, 0.2), lay, changed)
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):  # the uncond row changed: the cond row's choice does not
        assert same_rows(ra["index"], rb["index"], 0)
    if CASES[name].data_dependent:  # and the rows do make their own choices
        assert any(not same_rows(r["index"], r["index"], 0, 1) for r in a)
        swapped = drive(build(name, 0.2), lay, {n: t.flip(0) for n, t in base.items()})
        if name != "random":  # random draws by position, not by data
            for ra, rs in zip(a, swapped, strict=True):
                assert same_rows(ra["index"], [x.flip(0) for x in per_head(rs["index"])], slice(None))


@pytest.mark.parametrize(
    "h, w, grid", [(1, 1, 4), (2, 3, 4), (3, 2, 4), (1, 7, 4), (4, 4, 4), (5, 7, 4), (8, 8, 4), (64, 40, 4), (9, 6, 3)]
)
def test_grid_window_takes_one_centre_per_cell(h, w, grid):
    win = grid_window(h, w, grid)
    rows, cols = win // w, win % w
    assert win.numel() == min(h, grid) * min(w, grid) == len(set(win.tolist()))
    assert bool((win[1:] > win[:-1]).all()) and int(win.max()) < h * w
    for pos, side in ((rows, h), (cols, w)):
        chosen = set(pos.tolist())
        assert len(chosen) == min(side, grid)
        for c in range(grid):  # cell c covers [c*side//grid, (c+1)*side//grid); its middle token is chosen
            lo, hi = c * side // grid, (c + 1) * side // grid
            assert {i for i in chosen if lo <= i < hi} == ({lo + (hi - lo) // 2} if hi > lo else set())


def test_scalekv_keeps_its_window_and_uses_the_real_queries():
    """The grid-window tokens of the current map survive, and the scores are those of the queries passed in."""
    lay = layout(rows=2, sizes=[(1, 1), (2, 2), (6, 5), (8, 8)], layers=2)
    data = random_data(lay, seed=5)
    records = drive(make_cache("scalekv", budget=0.3, drafters=[]), lay, data)
    scale = lay.scales[2]
    window = grid_window(scale.h, scale.w, 4)
    for r in records:
        if r["scale"] == 2 and r["capacity"] >= window.numel():
            forced = window + (r["length"] - scale.length)
            assert bool(torch.isin(forced, r["index"]).all())
    # scaling the queries changes the softmax, so the choice changes
    louder = dict(data, q=data["q"] * 8)
    again = drive(make_cache("scalekv", budget=0.3, drafters=[]), lay, louder)
    assert any(not torch.equal(a["index"], b["index"]) for a, b in zip(records, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 40),
    data=st.data(),
)
def test_keep_top_invariants(length, data):
    capacity = data.draw(st.integers(1, length))
    forced = data.draw(st.lists(st.integers(0, length - 1), unique=True, max_size=length))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    scores = torch.randn(2, 3, length, generator=g)
    index = keep_top(scores, capacity, torch.tensor(forced, dtype=torch.int64))
    assert index.shape == (2, 3, capacity)
    assert bool((index[..., 1:] > index[..., :-1]).all()) and int(index.min()) >= 0 and int(index.max()) < length
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    is_forced = torch.zeros(length, dtype=torch.bool)
    is_forced[forced] = True
    if len(forced) >= capacity:  # only forced tokens, the best of them
        assert not bool((kept & ~is_forced).any())
        best = scores[..., forced].topk(capacity, dim=-1).values.min(-1).values
        assert bool((scores.masked_fill(~kept, math.inf).amin(-1) >= best).all())
    else:  # every forced token, then the best of the rest
        assert bool(kept[..., is_forced].all())
        free_kept = scores.masked_fill(~kept | is_forced, math.inf).amin(-1)
        free_dropped = scores.masked_fill(kept | is_forced, -math.inf).amax(-1)
        assert bool((free_kept >= free_dropped).all())


# -- ScaleKV's release-equivalent selection ------------------------------------------------------------------------
def release_reference(q, k, h, w, capacity, grid=4, kernel=5, pooling="max", softmax_scale=1.0):
    """The README steps of fixtures/scalekv_release_selection, one (row, head) at a time in float64: the window
    positions (list) and the masked pooled scores ``(rows, heads, L)``; below the window, the raw sums instead."""
    rows, heads, length, _ = k.shape
    n, start = h * w, length - h * w
    if min(h, w) >= grid:
        ph, pw = h // grid, w // grid
        local = [(a * ph + (ph - 1) // 2) * w + b * pw + (pw - 1) // 2 for a in range(grid) for b in range(grid)]
        window = [start + t for t in local]
    else:  # the most recent grid*grid cached tokens, their query positions clamped into the map
        window = list(range(max(0, length - grid * grid), length))
        local = [min(max(p - start, 0), n - 1) for p in window]
    out = torch.empty(rows, heads, length, dtype=torch.float64)
    for r in range(rows):
        for head in range(heads):
            raw = (q[r, head].double()[local] @ k[r, head].double().T * softmax_scale).sum(0)
            if capacity <= len(window):
                out[r, head] = raw
                continue
            raw[window] = -math.inf
            for j in range(length):
                near = raw[max(0, j - kernel // 2) : j + kernel // 2 + 1]
                out[r, head, j] = near.max() if pooling == "max" else near.sum() / kernel  # avg counts the padding
            out[r, head, window] = -math.inf
    return window, out


def assert_release_top_set(index, window, scores, capacity):
    """``index`` keeps the window (or, below it, its best positions) and then the best others by ``scores``, up to
    float32 rounding; equal scores may go either way."""
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    in_window = torch.zeros(scores.shape[-1], dtype=torch.bool)
    in_window[window] = True
    assert index.shape[-1] == capacity and bool((index[..., 1:] > index[..., :-1]).all())
    if capacity <= len(window):
        assert not bool((kept & ~in_window).any())
        candidates = in_window
    else:
        assert bool(kept[..., in_window].all())
        candidates = ~in_window
    low = scores.masked_fill(~kept | ~candidates, math.inf).amin(-1)
    high = scores.masked_fill(kept | ~candidates, -math.inf).amax(-1)
    assert bool((low >= high - 1e-5 * (1 + high.abs())).all()), (low, high)


@pytest.mark.parametrize(
    "h, w, rows, cols",
    [
        (20, 20, [2, 7, 12, 17], [2, 7, 12, 17]),  # SPEC §9 / the fixture README's table
        (24, 24, [2, 8, 14, 20], [2, 8, 14, 20]),  # even patch: the token before the middle
        (48, 48, [5, 17, 29, 41], [5, 17, 29, 41]),
        (4, 4, [0, 1, 2, 3], [0, 1, 2, 3]),
        (7, 5, [0, 1, 2, 3], [0, 1, 2, 3]),  # p = 1: the tokens past 4 belong to no patch
        (24, 40, [2, 8, 14, 20], [4, 14, 24, 34]),  # non-square: each side by its own patch
        (9, 16, [0, 2, 4, 6], [1, 5, 9, 13]),
    ],
)
def test_release_window_centres(h, w, rows, cols):
    win = release_window(h, w, 4)
    assert win.dtype == torch.int64 and win.tolist() == [r * w + c for r in rows for c in cols]
    assert release_window(h, w, 2).numel() == 4


@pytest.mark.parametrize("h, w", [(3, 3), (1, 1), (3, 8), (8, 2)])
def test_release_window_below_the_grid_takes_the_most_recent_tokens(h, w):
    assert release_window(h, w, 4) is None
    cache = make_cache("scalekv", budget=0.3, drafters=[], selection="release")
    cache.reset(layout(sizes=[(1, 1), (2, 2), (h, w), (5, 5)]))
    scale = cache.layout.scales[2]
    for length, count in ((scale.length + 30, 16), (scale.length + 2, min(16, scale.length + 2))):
        positions, queries = cache.release_window_at(scale, length, torch.device("cpu"))
        assert positions.tolist() == list(range(length - count, length))
        first = length - scale.length  # cached tokens before the map are scored with its first query
        assert queries.tolist() == [max(0, p - first) for p in positions.tolist()]


@pytest.mark.parametrize(
    "kwargs", [{}, {"pooling": "avg"}, {"kernel": 1}, {"grid": 2, "kernel": 3}], ids=["max5", "avg5", "k1", "grid2"]
)
@pytest.mark.parametrize("budget", BUDGETS)
def test_release_selection_follows_the_release_steps(budget, kwargs):
    """On non-square maps, maps below the grid and capacities below the window, through the cache protocol."""
    lay = layout(sizes=ODD_SIZES + [(4, 6), (8, 5), (2, 2)], heads=2)
    lay = CacheLayout(lay.num_layers, lay.num_heads, lay.head_dim, lay.scales, lay.rows, lay.cond_rows, 0.5)
    data = random_data(lay, seed=2)
    cache = make_cache("scalekv", budget=budget, drafters=[], selection="release", **kwargs)
    assert cache.pooling == kwargs.get("pooling", "max")
    records = drive(cache, lay, data)
    assert records
    for r in records:
        scale = lay.scales[r["scale"]]
        q = data["q"][:, :, scale.start : scale.end] + r["layer"]
        window, scores = release_reference(
            q, r["k"], scale.h, scale.w, r["capacity"], cache.grid, cache.kernel, cache.pooling, 0.5
        )
        assert_release_top_set(r["index"], window, scores, r["capacity"])


def test_release_selection_keeps_as_many_tokens_as_the_default():
    lay = layout(sizes=ODD_SIZES + [(8, 8), (3, 5)])
    data = random_data(lay, seed=4)
    spec = make_cache("scalekv", budget=0.2, drafters=[0])
    release = make_cache("scalekv", budget=0.2, drafters=[0], selection="release")
    a, b = drive(spec, lay, data), drive(release, lay, data)
    assert spec.selection == "spec" and spec.plan.capacities == release.plan.capacities
    assert [(r["layer"], r["scale"], r["index"].shape) for r in a] == [
        (r["layer"], r["scale"], r["index"].shape) for r in b
    ]
    assert spec.scale_lengths == release.scale_lengths and spec.scale_nbytes == release.scale_nbytes
    assert any(not torch.equal(x["index"], y["index"]) for x, y in zip(a, b, strict=True))  # different tokens


def test_release_keep_in_bfloat16_keeps_the_dtype_and_the_window():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 64, 8, generator=g).bfloat16(), torch.randn(2, 3, 90, 8, generator=g).bfloat16()
    window = release_window(8, 8, 4) + 26
    index = release_keep(q[:, :, window - 26], k, window, 40, 5, "max", 8**-0.5)
    assert index.dtype == torch.int64 and index.shape == (2, 3, 40)
    assert bool(torch.isin(window, index).all()) and bool((index[..., 1:] > index[..., :-1]).all())


def test_selection_setting_from_the_plan_and_bad_values(tmp_path, capsys):
    plan = rule_plan(make_scales(ODD_SIZES), 3, 0.3, [0])
    with_release = dataclasses.replace(plan, selection={"selection": "release", "kernel": 3})
    cache = make_cache("scalekv", plan=with_release.save(tmp_path / "plan.json"))
    assert (cache.selection, cache.kernel, cache.pooling) == ("release", 3, "max")
    assert main(["plan", "show", str(tmp_path / "plan.json")]) == 0
    assert "selection: release, kernel 3" in capsys.readouterr().out
    cache = make_cache("scalekv", plan=with_release, selection="spec", pooling="avg")
    assert (cache.selection, cache.kernel, cache.pooling) == ("spec", 3, "avg")
    assert Plan.from_dict(with_release.to_dict()).selection == {"selection": "release", "kernel": 3}
    message = "selection='snap': expected one of 'spec', 'release'"
    with pytest.raises(ValueError, match=message):
        make_cache("scalekv", budget=0.1, drafters=[0], selection="snap")
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(plan, selection={"selection": "snap"})
    with pytest.raises(ValueError, match="selection=None: expected one of"):
        dataclasses.replace(plan, selection={"selection": None})


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), float("inf"), "0.1", True])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_budget_is_one_clear_error(name, budget):
    with pytest.raises(ValueError, match=r"budget=.*expected"):
        build(name, budget)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="unknown cache policy 'lru'"):
        make_cache("lru", budget=0.1)
    with pytest.raises(ValueError, match="keeps every token"):
        make_cache("full", budget=0.5)
    with pytest.raises(ValueError, match="needs budget"):
        make_cache("snapkv")
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['plan'\]"):
        make_cache("snapkv", budget=0.1, plan="x.json")
    with pytest.raises(ValueError, match="exactly one of plan"):
        make_cache("scalekv", budget=0.1)
    with pytest.raises(ValueError, match="pooling='median'"):
        make_cache("snapkv", budget=0.1, pooling="median")
    with pytest.raises(ValueError, match="kernel=4"):
        make_cache("scalekv", budget=0.1, drafters=[0], kernel=4)


# -- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture
def cli_pipe(monkeypatch, pipe):
    monkeypatch.setattr("scalekv.hub.load_pipeline", lambda name, weights=None: pipe)
    return pipe


def test_cli_generate_writes_images_and_stats(cli_pipe, tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "generate",
            "--model",
            "tiny",
            "--labels",
            "1,2",
            "--policy",
            "snapkv",
            "--budget",
            "0.1",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == stats["images"] and len(stats["images"]) == 2
    assert stats["policy"] == "snapkv" and stats["budget"] == 0.1 and stats["average_capacity"] == round(0.1 * 55)
    assert (stats["cfg"], stats["top_k"], stats["top_p"], stats["greedy"]) == (1.5, 900, 0.96, False)
    assert 0 < stats["kv_bytes_history"] < stats["kv_bytes_peak"] < stats["kv_bytes_reference"]
    assert stats["kv_peak_ratio"] == stats["kv_bytes_peak"] / stats["kv_bytes_reference"]
    assert stats["kv_history_ratio"] == stats["kv_bytes_history"] / stats["kv_bytes_reference"]
    assert 0 < stats["compress_seconds"] < stats["seconds"]
    assert [sum(r) for r in stats["kv_bytes_per_scale_and_layer"]][-2] == stats["kv_bytes_history"]
    direct = cli_pipe.generate([1, 2], seed=3, cfg=1.5, top_k=900, top_p=0.96, cache=make_cache("snapkv", budget=0.1))
    assert stats["cache_lengths_per_scale"] == [r.cache_lengths for r in direct.scales]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "snapkv", "--budget", "0"], "budget=0.0"),
        (["--policy", "snapkv", "--budget", "1.01"], "budget=1.01"),
        (["--policy", "h2o", "--budget", "nan"], "budget=nan"),
        (["--policy", "lru", "--budget", "0.1"], "unknown cache policy"),
        (["--policy", "scalekv", "--plan", "MALFORMED"], "malformed"),
        (["--policy", "scalekv", "--plan", "RELEASED"], "made for the schedule"),
    ],
)
def test_cli_errors_write_nothing(cli_pipe, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "scalekv-plan/1", "budget": 0.1, "num_layers": 4, "scales": [{"h": 1}]}))
    extra = [{"MALFORMED": str(bad), "RELEASED": str(RELEASED_2B)}.get(x, x) for x in extra]
    out = tmp_path / "out"
    rc = main(["generate", "--model", "tiny", "--labels", "1", "--out", str(out), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
