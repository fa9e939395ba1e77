"""Calibration that measures: the settings search, its record in the plan, its bounds and its errors."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from scalekv.cache.plan import load_plan
from scalekv.calibration.calibrate import calibrate
from scalekv.calibration.search import DIMENSIONS, ImageFidelity, Setting, candidates, search
from scalekv.cli import main

from .helpers import tiny_pipeline

BUDGET = 0.3  # tiny schedule 1..6: compressed after scales 3 and 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(depth=4)


@pytest.fixture(scope="module")
def searched(pipe):
    return calibrate(pipe, BUDGET, samples=2, batch_size=1, seed=11, top_k=10)


def test_the_same_seed_gives_the_same_search(pipe, searched):
    again = calibrate(pipe, BUDGET, samples=2, batch_size=1, seed=11, top_k=10)
    first, second = dict(searched.provenance["search"]), dict(again.provenance["search"])
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert searched.selection == again.selection and searched.capacities == again.capacities


def test_the_chosen_setting_is_the_best_row_of_its_table_and_the_plan_uses_it(searched):
    record = searched.provenance["search"]
    table = record["table"]
    assert len(table) > len(DIMENSIONS)  # every dimension had more than its starting value tried
    best = max(table, key=lambda r: r["psnr"])
    assert record["chosen"]["psnr"] == best["psnr"]
    chosen = record["chosen"]
    assert searched.selection == {
        k: chosen[k] for k in ("selection", "grid", "kernel", "pooling", "scoring", "keep_window")
    }
    prov = searched.provenance
    assert [prov["refiner_start"], prov["refiner_end"]] == chosen["refiners"]
    assert prov["num_drafters"] == chosen["drafters"] and prov["combine"] == chosen["combine"]
    assert len({tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("psnr", "ssim"))) for r in table}) == len(
        table
    )  # no setting scored twice


def test_the_recorded_scores_are_what_the_plan_gives(pipe, searched):
    """Regenerating the calibration images with the saved plan gives the recorded PSNR of the chosen row."""
    from scalekv.cache import make_cache
    from scalekv.images import to_uint8
    from scalekv.metrics import psnr_ssim

    labels, seeds = [0, 1], [11, 12]
    full = to_uint8(pipe.generate(labels, seed=seeds, top_k=10).images)
    ours = to_uint8(pipe.generate(labels, cache=make_cache("scalekv", plan=searched), seed=seeds, top_k=10).images)
    psnr, _ = psnr_ssim(full, ours)
    assert float(psnr.mean()) == pytest.approx(searched.provenance["search"]["chosen"]["psnr"], abs=1e-3)


def test_every_registered_baseline_is_scored_on_the_same_images(searched):
    from scalekv.cache.registry import POLICIES

    baselines = {b["policy"]: b for b in searched.provenance["search"]["baselines"]}
    assert set(baselines) == set(POLICIES) - {"full", "scalekv"}
    for b in baselines.values():
        assert "skipped" in b or 0 < b["psnr"] <= 100


def test_pinned_settings_are_not_searched(pipe):
    plan = calibrate(
        pipe,
        BUDGET,
        samples=2,
        seed=5,
        top_k=10,
        selection={"grid": 2, "selection": "spec"},
        num_drafters=1,
        baselines={},
    )
    table = plan.provenance["search"]["table"]
    assert {r["grid"] for r in table} == {2} and {r["drafters"] for r in table} == {1}
    assert {r["selection"] for r in table} == {"spec"}
    assert len({r["kernel"] for r in table}) > 1  # what is not pinned is searched
    assert plan.provenance["search"]["pinned"] == ["drafters", "grid", "selection"]


def test_search_off_makes_the_default_plan_without_other_generations(pipe):
    calls = []
    plain = pipe.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    pipe.generate = counted
    try:
        plan = calibrate(pipe, BUDGET, samples=4, batch_size=2, seed=11, top_k=10, search="off")
    finally:
        del pipe.generate
    assert len(calls) == 2  # the statistics pass alone
    assert "search" not in plan.provenance and plan.selection == {}
    assert plan.provenance["combine"] == "product"


def test_the_working_set_holds_no_candidate_images(pipe):
    """The fidelity scorer keeps only the reference: every candidate's generation is freed after its scores."""
    alive: list[weakref.ref] = []

    def generate(batch, *, cache, seed):
        assert all(r() is None for r in alive)  # nothing of an earlier generation is alive any more
        gen = pipe.generate(batch, cache=cache, seed=seed, top_k=10)
        alive.append(weakref.ref(gen))
        return gen

    from scalekv.cache import make_cache
    from scalekv.images import to_uint8

    labels = [0, 1, 2]
    reference = to_uint8(pipe.generate(labels, seed=[3, 4, 5], top_k=10).images)
    score = ImageFidelity(generate, labels, reference, seed=3, batch_size=2)
    for name in ("snapkv", "h2o"):
        psnr, ssim = score(lambda name=name: make_cache(name, budget=BUDGET))
        gc.collect()
        assert psnr.shape == (3,) and ssim.shape == (3,)
    gc.collect()
    assert all(r() is None for r in alive) and score.generations == 2
    same, _ = score(lambda: make_cache("full"))
    assert np.all(same == 100)  # the full cache reproduces its reference exactly


def test_coordinate_descent_moves_only_to_strictly_better_rows():
    """On a made-up score the search finds the best value of each dimension and keeps ties at the earlier value."""
    target = {"grid": 2, "kernel": 3, "pooling": "max", "combine": "sum"}

    def score_of(setting: Setting) -> float:
        return sum(getattr(setting, k) == v for k, v in target.items())

    current = {}

    def make_plan(setting):
        if setting.drafters > 4:
            raise ValueError("too many drafters")
        current["s"] = setting
        return setting

    def score(factory):
        value = score_of(factory())
        return np.array([value]), np.array([value / 10])

    chosen, rows = search(make_plan, score, lambda plan, s: plan, start=Setting(drafters=2), default_drafters=2)
    assert {k: getattr(chosen, k) for k in target} == target
    assert chosen.drafters == 2 and chosen.selection == "spec"  # ties keep the starting value
    assert all(r.setting.drafters <= 4 for r in rows)  # the setting that makes no plan is skipped
    assert chosen == max(rows, key=lambda r: r.psnr).setting
    assert candidates("drafters", "fast", 2, {}) == [1, 2, 4]
    assert candidates("grid", "full", 2, {"grid": 3}) == [3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"search": "quick"}, "search='quick'"),
        ({"selection": {"grid": 0}}, "grid=0"),
        ({"selection": {"kernel": 4}}, "kernel=4"),
        ({"selection": {"selection": "release", "scoring": "mass"}}, "scoring='mass' with selection='release'"),
        ({"selection": {"window": 3}}, "selection keys \\['window'\\]"),
        ({"selection": {"keep_window": "no"}}, "keep_window='no'"),
        ({"selection": {"selection": "release", "keep_window": False}}, "always keeps its window"),
        ({"seeding": "batch"}, "needs per-image seeding"),
        ({"refiner_start": 0.5, "refiner_end": 0.9}, "refiner_end=0.9"),
        ({"combine": "mean"}, "combine='mean'"),
    ],
)
def test_bad_settings_are_refused_before_any_generation(kwargs, match):
    pipe = tiny_pipeline(depth=4)

    def refuse(*args, **kw):
        raise AssertionError("generated before checking its arguments")

    pipe.generate = refuse
    with pytest.raises(ValueError, match=match):
        calibrate(pipe, BUDGET, samples=2, **kwargs)
    for budget in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            calibrate(pipe, budget, samples=2, **kwargs)


def test_cli_search_flags_and_plan_show(tmp_path, capsys, monkeypatch):
    import scalekv.hub

    monkeypatch.setattr(scalekv.hub, "load_pipeline", lambda name, weights=None, **kw: tiny_pipeline(depth=4))
    monkeypatch.setattr("scalekv.hub.default_sampling", lambda model, weights: {"cfg": 1.5, "top_k": 10})
    out = tmp_path / "plan.json"
    argv = ["calibrate", "--model", "tiny", "--budget", "0.3", "--samples", "2", "--no-plots", "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*argv, "--search", "slow"])
    assert "invalid choice: 'slow'" in capsys.readouterr().err
    assert main([*argv, "--seeding", "batch"]) == 2
    assert "needs --seeding image" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--kernel", "3", "--scoring", "logits", "--keep-window", "no"]) == 0
    printed = capsys.readouterr().out
    assert "search (fast" in printed and "baselines at the same budget" in printed
    plan = load_plan(out)
    assert plan.selection["kernel"] == 3 and plan.selection["scoring"] == "logits"
    assert plan.selection["keep_window"] is False
    assert main(["plan", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    rows = [line for line in shown.splitlines() if line.startswith("  ") and " dB  " in line]
    assert len(rows) == len(plan.provenance["search"]["table"])
    assert "pinned: keep_window, kernel, scoring" in shown and "snapkv" in shown


def test_logit_scoring_scores_by_the_window_queries_summed_raw_logits(pipe):
    from types import SimpleNamespace

    from scalekv.cache import make_cache
    from scalekv.cache.policy import attention_mass
    from scalekv.cache.scalekv import grid_window, window_logit_sum

    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    scale = layout.scales[4]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, layout.num_heads, scale.length, layout.head_dim, generator=gen)
    store = SimpleNamespace(k=torch.randn(2, layout.num_heads, scale.end, layout.head_dim, generator=gen))
    window = grid_window(scale.h, scale.w, 4)
    scores = {}
    for scoring in ("logits", "mass"):
        cache = make_cache("scalekv", budget=BUDGET, drafters=[0], scoring=scoring, kernel=1)
        cache.reset(layout)
        scores[scoring] = cache.score(1, scale, q, store)
    assert torch.allclose(scores["logits"], window_logit_sum(q[:, :, window], store.k, 1.0).float())
    assert torch.allclose(scores["mass"], attention_mass(q[:, :, window], store.k, 1.0))
    with pytest.raises(ValueError, match="scoring='sum'"):
        make_cache("scalekv", budget=BUDGET, drafters=[0], scoring="sum")


def test_a_scored_window_competes_with_the_other_tokens(pipe):
    """With keep_window=False the window is not forced in: the kept tokens are the top scores alone."""
    from types import SimpleNamespace

    from scalekv.cache import make_cache
    from scalekv.cache.policy import keep_top

    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    scale = layout.scales[4]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, layout.num_heads, scale.length, layout.head_dim, generator=gen)
    k = torch.randn(2, layout.num_heads, scale.end, layout.head_dim, generator=gen)
    store = SimpleNamespace(k=k, length=scale.end)
    kept = {}
    for keep in (True, False):
        cache = make_cache("scalekv", budget=BUDGET, drafters=[0], keep_window=keep, kernel=1)
        cache.reset(layout)
        scores = cache.score(1, scale, q, store)
        forced = cache.forced(1, scale, store, 20)
        assert (forced is None) == (not keep)
        kept[keep] = cache.select(1, scale, q, store, 20)  # window 16 + 4
        assert torch.equal(kept[keep], keep_top(scores, 20, forced))
    window = cache._window(scale, k.device) + scale.start
    assert all(bool(torch.isin(window, row).all()) for row in kept[True].flatten(0, 1))
    assert not torch.equal(kept[True], kept[False])


def test_budget_is_required_for_a_plan_and_refused_missing_before_loading(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "demo", "--out", str(out)]) == 2
    assert "--budget is required for a ScaleKV plan" in capsys.readouterr().err and not out.exists()
