"""ASI calibration: statistics -> drafters -> plan, the plan's selection settings, the CLI, plots, shipped plans."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from scalekv.cache import make_cache
from scalekv.cache.plan import Plan, load_plan
from scalekv.calibration.calibrate import (
    AttentionStats,
    calibrate,
    collect_stats,
    default_inputs,
    plan_from_stats,
    stats_from_plan,
)
from scalekv.calibration.stats import attention_shares
from scalekv.cli import main

from .helpers import tiny_pipeline

BUDGET = 0.3  # tiny schedule 1..6: prefix 55, B = 16, compressed after scales 3 and 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(depth=4)


@pytest.fixture(scope="module")
def stats(pipe):
    def gen(batch, *, cache, seed):
        return pipe.generate(batch, cache=cache, seed=seed)

    return collect_stats(gen, default_inputs(10, 6), budget=BUDGET, batch_size=4, seed=3)


def compressed_pairs(plan: Plan) -> list[tuple[int, int]]:
    return [(k, layer) for k in plan.compressed_scales for layer in range(plan.num_layers)]


def test_the_same_seed_gives_the_same_plan_and_another_seed_other_statistics(pipe):
    a = calibrate(pipe, BUDGET, samples=4, batch_size=2, seed=7, search="off")
    b = calibrate(pipe, BUDGET, samples=4, batch_size=2, seed=7, search="off")
    c = calibrate(pipe, BUDGET, samples=4, batch_size=2, seed=8, search="off")
    assert a.to_dict() == b.to_dict()
    assert a.provenance["statistics"]["topk"] != c.provenance["statistics"]["topk"]
    assert a.provenance["seed"] == 7 and a.provenance["statistics"]["samples"] == 4


@pytest.mark.parametrize("combine", ["sum", "product", "topk", "current"])
@pytest.mark.parametrize("num_drafters", [0, 1, 3])
def test_per_scale_mean_is_b_and_drafters_are_the_lowest_z(stats, combine, num_drafters):
    plan = plan_from_stats(stats, BUDGET, combine=combine, num_drafters=num_drafters)
    assert plan.compressed_scales == [3, 4]
    b = plan.provenance["average_capacity"]
    assert b == 16 and stats.top_k == 16  # K' defaults to B
    for k in plan.compressed_scales:
        assert sum(plan.capacities[k]) == b * plan.num_layers
    z = torch.tensor(plan.provenance["statistics"]["z"])
    pairs = compressed_pairs(plan)
    lowest = sorted(pairs, key=lambda p: (z[p].item(), p))[:num_drafters]
    chosen = [(k, layer) for k, layers in enumerate(plan.drafters) for layer in layers]
    assert sorted(chosen) == sorted(lowest)
    # z is the per-scale standardised ASI
    asi = torch.tensor(plan.provenance["statistics"]["asi"])
    for k in plan.compressed_scales:
        assert z[k].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z[k].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3) or asi[k].std() < 1e-6


def test_drafters_keep_more_than_refiners_and_refiners_decay(stats):
    plan = plan_from_stats(stats, BUDGET, combine="product", num_drafters=2, refiner_start=0.9, refiner_end=0.5)
    for k in plan.compressed_scales:
        drafters = set(plan.drafters[k])
        refiners = [plan.capacities[k][i] for i in range(plan.num_layers) if i not in drafters]
        if drafters:
            assert min(plan.capacities[k][i] for i in drafters) > max(refiners)
    # refiners get fewer tokens at the later compressed scale (0.9 B -> 0.5 B) where both scales have drafters
    first, last = plan.compressed_scales
    if plan.drafters[first] and plan.drafters[last]:
        ref = [i for i in range(plan.num_layers) if i not in plan.drafters[first] + plan.drafters[last]]
        assert plan.capacities[last][ref[0]] < plan.capacities[first][ref[0]]


def test_uniform_ablation_keeps_flags_but_gives_every_layer_b(stats):
    plan = plan_from_stats(stats, BUDGET, num_drafters=2, uniform=True)
    assert sum(len(d) for d in plan.drafters) == 2
    for k in plan.compressed_scales:
        assert set(plan.capacities[k]) == {16}


def test_calibrated_plan_round_trips_and_drives_the_cache(stats, pipe, tmp_path):
    plan = plan_from_stats(stats, BUDGET, num_drafters=2)
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again == plan
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600
    assert stats_from_plan(again).current.shape == (6, 4)
    cache = make_cache("scalekv", plan=path)
    gen = pipe.generate([1, 2], cache=cache, seed=0)
    for k in again.compressed_scales:  # what every layer holds after scale k is its planned capacity
        assert gen.scales[k].cache_lengths == list(again.capacities[k])


def test_selection_settings_travel_with_the_plan_and_can_be_overridden(stats, tmp_path):
    import dataclasses

    plan = dataclasses.replace(plan_from_stats(stats, BUDGET), selection={"grid": 2, "kernel": 1, "pooling": "max"})
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["selection"] == {"grid": 2, "kernel": 1, "pooling": "max"}
    cache = make_cache("scalekv", plan=path)
    assert (cache.grid, cache.kernel, cache.pooling) == (2, 1, "max")
    cache = make_cache("scalekv", plan=path, grid=3, kernel=5)
    assert (cache.grid, cache.kernel, cache.pooling) == (3, 5, "max")
    plain = make_cache("scalekv", plan=plan_from_stats(stats, BUDGET))
    assert (plain.grid, plain.kernel, plain.pooling) == (4, 5, "avg")  # SPEC §5
    with pytest.raises(ValueError, match="selection keys \\['window'\\]"):
        dataclasses.replace(plan, selection={"window": 3})
    with pytest.raises(ValueError, match="kernel=4"):
        dataclasses.replace(plan, selection={"kernel": 4})


def test_accumulators_stay_bounded_on_a_long_schedule(monkeypatch):
    """The streamed pass never forms more than rows x head_chunk x query_chunk x L scores, however long L is."""
    rows, heads, n, history, d = 2, 8, 1024, 3000, 16
    q = torch.randn(rows, heads, n, d)
    k = torch.randn(rows, heads, history + n, d)
    largest = []
    real = torch.matmul

    def spy(a, b):
        out = real(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    attention_shares(q, k, history, 0.25, 100, query_chunk=64, head_chunk=2)
    assert max(largest) <= rows * 2 * 64 * (history + n)
    assert max(largest) < rows * heads * n * (history + n) / 50


def test_statistics_tables_have_one_row_per_scale_on_a_long_schedule():
    pipe = tiny_pipeline(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 12, 14), depth=2)

    def gen(batch, *, cache, seed):
        return pipe.generate(batch, cache=cache, seed=seed)

    s = collect_stats(gen, [0], top_k=8, query_chunk=16, head_chunk=1)
    assert s.current.shape == s.topk.shape == (10, 2)
    assert torch.all(s.current + s.topk <= 1 + 1e-6)


def test_bad_inputs_are_refused_with_the_value(stats, pipe):
    with pytest.raises(ValueError, match="num_drafters=9"):
        plan_from_stats(stats, BUDGET, num_drafters=9)  # 2 compressed scales x 4 layers = 8 pairs
    with pytest.raises(ValueError, match="every layer a drafter"):
        plan_from_stats(stats, BUDGET, combine="product", num_drafters=8)
    with pytest.raises(ValueError, match="combine='mean'"):
        plan_from_stats(stats, BUDGET, combine="mean")
    for bad in (0, 1.5, math.nan):
        with pytest.raises(ValueError, match="budget"):
            plan_from_stats(stats, bad)
    with pytest.raises(ValueError, match="samples=0"):
        calibrate(pipe, BUDGET, samples=0)
    with pytest.raises(ValueError, match="at least one input"):
        collect_stats(lambda *a, **k: None, [], budget=BUDGET)
    with pytest.raises(ValueError, match="batch_size=0"):
        collect_stats(lambda *a, **k: None, [1], budget=BUDGET, batch_size=0)
    with pytest.raises(ValueError, match="exactly one of top_k"):
        collect_stats(lambda *a, **k: None, [1], budget=BUDGET, top_k=4)
    with pytest.raises(ValueError, match="no calibration statistics"):
        stats_from_plan(make_cache("scalekv", budget=BUDGET, drafters=[0]).make_plan(pipe.model.cache_layout(2, 1)))
    with pytest.raises(ValueError, match="malformed"):
        AttentionStats.from_dict({"schedule": [[1, 1]]})


def test_cli_writes_plan_and_plots_and_refuses_bad_paths(tmp_path, capsys, monkeypatch):
    import scalekv.hub

    monkeypatch.setattr(scalekv.hub, "load_pipeline", lambda name, weights=None, **kw: tiny_pipeline(depth=4))
    monkeypatch.setattr("scalekv.hub.default_sampling", lambda model, weights: {"cfg": 1.5, "top_k": 10})
    out = tmp_path / "plan.json"
    # a made-up name: the tiny model is no var-d16, and a plan labelled so would be refused on load
    argv = ["calibrate", "--model", "tiny", "--budget", "0.3", "--samples", "3", "--drafters", "1", "--grid", "2"]
    argv += ["--search", "off"]
    assert main([*argv, "--out", str(out)]) == 0
    plan = load_plan(out)
    assert plan.selection == {"grid": 2} and sum(len(d) for d in plan.drafters) == 1
    assert (tmp_path / "plan_asi.png").stat().st_size > 0 and (tmp_path / "plan_capacities.png").stat().st_size > 0
    assert main([*argv, "--out", str(tmp_path / "missing" / "plan.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*argv, "--prompts", "p.txt", "--out", str(tmp_path / "p.json")]) == 2
    assert "Infinity models only" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
    assert main(["plan", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "calibrated: ASI product, N_d = 1 of 8 pairs" in shown and "selection: grid 2" in shown


@pytest.mark.parametrize("percent", [4, 10, 20])
def test_demo_ships_calibrated_plans_that_the_cache_uses_by_default(percent):
    from scalekv.hub import default_plan, policy_defaults

    path = default_plan("demo", percent / 100)
    assert path is not None and path.name == f"scalekv_{percent}pct.json"
    plan = load_plan(path)
    assert plan.budget == pytest.approx(percent / 100) and plan.provenance["rule"] == "scalekv-asi"
    assert policy_defaults("demo", "scalekv", percent / 100) == {"plan": str(path)}
    assert default_plan("demo", 0.15) is None and policy_defaults("demo", "snapkv", 0.1) == {}


def test_calibration_runs_on_infinity_and_its_plan_drives_the_cache():
    """The same statistics and plan on a text-to-image model (tiny random Infinity, its first 6 scales)."""
    from .test_infinity import random_text
    from .test_infinity import tiny_pipeline as tiny_infinity
    from .test_infinity_policies import SCHEDULE

    inf = tiny_infinity(vae_overrides=dict(base_ch=8, groups=8))

    def gen(batch, *, cache, seed):
        return inf.generate(random_text([3] * len(batch), seed=batch[0]), schedule=SCHEDULE, top_k=1, cache=cache)

    stats = collect_stats(gen, [0, 1], budget=0.3, batch_size=1)
    assert stats.current.shape == (len(SCHEDULE.scales), inf.model.cfg.depth)
    plan = plan_from_stats(stats, 0.3, num_drafters=2)
    generation = inf.generate(random_text([3]), schedule=SCHEDULE, top_k=1, cache=make_cache("scalekv", plan=plan))
    for k in plan.compressed_scales:
        assert generation.scales[k].cache_lengths == list(plan.capacities[k])
