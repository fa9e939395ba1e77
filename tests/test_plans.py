"""Budgets and plans: the released ScaleKV files, our JSON format, the rule, and `scalekv plan`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalekv.cache import CacheLayout, ScaleKV, make_scales
from scalekv.cache.plan import (
    INFINITY_1M_SQUARE,
    PLANS_DIR,
    Plan,
    allocate,
    average_capacity,
    first_compressed_scale,
    load_plan,
    pyramid_plan,
    rule_plan,
    uniform_plan,
)
from scalekv.cli import main

from .helpers import tiny_pipeline

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "budgets"
RELEASED = ["infinity_2b_10pct.json", "infinity_8b_10pct.json"]
VAR_256 = make_scales([(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")
@pytest.mark.parametrize("name", RELEASED)
def test_shipped_budget_files_are_the_released_ones(name):
    assert (PLANS_DIR / name).read_bytes() == (REFERENCE / name).read_bytes()


@pytest.mark.parametrize("name", RELEASED)
def test_released_plan_reproduces_every_capacity(name):
    raw = json.loads((PLANS_DIR / name).read_text())
    plan = load_plan(PLANS_DIR / name)
    scales = make_scales(INFINITY_1M_SQUARE)
    assert plan.schedule == INFINITY_1M_SQUARE and plan.budget == 0.1
    entries = {int(key.split()[1]) - 2: entry for key, entry in raw.items()}  # "Scale N" -> scale index N - 2
    for s in scales:
        caps = plan.capacities[s.index]
        if s.index in entries:
            e = entries[s.index]
            flags = [e[f"Block {i}"] for i in range(plan.num_layers)]
            assert list(caps) == [e["Max"] if f else e["Min"] for f in flags]
            assert plan.drafters[s.index] == tuple(i for i, f in enumerate(flags) if f)
            assert sum(caps) == 650 * plan.num_layers  # the layer average is exactly 650
            assert e["Limit"] == plan.held(s.index)[plan.drafters[s.index][0]]  # previous Max + the new map
        elif s.is_last:
            assert list(caps) == plan.held(s.index)
        else:
            assert caps == (s.end,) * plan.num_layers and s.end <= 650
    # compression starts after the first scale whose cumulative length exceeds B = 650 (the 20x20 scale)
    assert plan.compressed_scales[0] == first_compressed_scale(scales, 650) == 7
    assert plan.compressed_scales == list(range(7, 12)) and plan.average_capacity == 650


def test_plan_show_json_gives_the_spec_capacities(capsys):
    assert main(["plan", "show", str(PLANS_DIR / "infinity_2b_10pct.json"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    got = [(s["h"], s["drafter_capacity"], s["refiner_capacity"]) for s in info["scales"] if s["compressed"]]
    # SPEC §4: drafter/refiner capacities after the 20x20 .. 48x48 scales
    assert got == [(20, 920, 632), (24, 1490, 594), (32, 2510, 526), (40, 4100, 420), (48, 6385, 465)]
    assert [s["drafters"] for s in info["scales"] if s["compressed"]] == [[0, 23]] * 4 + [[0]]
    assert info["average_capacity"] == 650 and info["num_layers"] == 32


def test_plan_show_text(capsys):
    assert main(["plan", "show", str(PLANS_DIR / "infinity_8b_10pct.json")]) == 0
    text = capsys.readouterr().out
    assert "B = 650 tokens per layer, 40 layers, 13 scales" in text
    row0 = next(line for line in text.splitlines() if line.startswith("    0 ") and "*" in line)
    assert "909*" in row0 and "6200*" in row0


# -- budgets and allocation --------------------------------------------------------------------------------------
def test_budget_to_average_capacity():
    assert average_capacity(0.1, VAR_256) == round(0.1 * (680 - 256))
    assert average_capacity(1.0, VAR_256) == 680 - 256
    assert first_compressed_scale(VAR_256, average_capacity(0.1, VAR_256)) == 4  # 1+4+9+16+25 = 55 > 42
    assert first_compressed_scale(VAR_256, 424) is None
    with pytest.raises(ValueError, match="expected at least 1"):
        average_capacity(0.001, VAR_256)
    for bad in (0, -1, 2, float("nan")):
        with pytest.raises(ValueError, match="expected a fraction in"):
            average_capacity(bad, VAR_256)


@settings(max_examples=80, deadline=None)
@given(
    caps=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    weights=st.data(),
    frac=st.floats(0.0, 1.2),
)
def test_allocate_invariants(caps, weights, frac):
    targets = weights.draw(st.lists(st.floats(0, 100), min_size=len(caps), max_size=len(caps)))
    total = max(len(caps), round(frac * sum(caps)))
    alloc = allocate(total, targets, caps)
    assert sum(alloc) == min(total, sum(caps))
    assert all(1 <= a <= c for a, c in zip(alloc, caps, strict=True))
    # among layers that are not capped, a larger target never gets fewer tokens (beyond rounding)
    free = [i for i in range(len(caps)) if alloc[i] < caps[i]]
    for i in free:
        for j in free:
            if targets[i] > targets[j]:
                assert alloc[i] >= alloc[j] - 1


@pytest.mark.parametrize("budget", [0.04, 0.1, 0.2])
def test_rule_plan_follows_spec(budget):
    scales = make_scales(INFINITY_1M_SQUARE)
    plan = rule_plan(scales, 32, budget, [0, 23])
    avg = average_capacity(budget, scales)
    first = first_compressed_scale(scales, avg)
    assert plan.compressed_scales == list(range(first, len(scales) - 1))
    refiners = []
    for k in plan.compressed_scales:
        caps = plan.capacities[k]
        assert sum(caps) == 32 * avg  # the layer mean is exactly B
        assert plan.drafters[k] == (0, 23)
        assert min(caps[0], caps[23]) > max(c for i, c in enumerate(caps) if i not in (0, 23))
        assert all(c <= h for c, h in zip(caps, plan.held(k), strict=True))  # nobody holds more than it could
        refiners.append(caps[1])
    assert refiners == sorted(refiners, reverse=True) and refiners[0] > refiners[-1]


def test_rule_plan_without_drafters_is_uniform_and_per_scale_drafters():
    scales = make_scales(INFINITY_1M_SQUARE)
    assert rule_plan(scales, 8, 0.1, []).capacities == uniform_plan(scales, 8, 0.1).capacities
    plan = rule_plan(scales, 8, 0.1, {3: [4], 7: [1], 11: [2, 3]})
    assert plan.drafters[7] == (1,) and plan.drafters[8] == () and plan.drafters[11] == (2, 3)
    assert plan.drafters[3] == (4,) and plan.capacities[3] == (scales[3].end,) * 8  # a role, but nothing to cut
    assert len(set(plan.capacities[8])) == 1
    with pytest.raises(ValueError, match="expected distinct layer indices in 0..7"):
        rule_plan(scales, 8, 0.1, [8])
    with pytest.raises(ValueError, match="drafters given for scales"):
        rule_plan(scales, 8, 0.1, {40: [1]})
    with pytest.raises(ValueError, match="refiner_end"):
        rule_plan(scales, 8, 0.1, [0], refiner_start=0.5, refiner_end=0.9)


def test_pyramid_plan_decreases_with_depth():
    plan = pyramid_plan(VAR_256, 16, 0.2)
    for k in plan.compressed_scales:
        caps = plan.capacities[k]
        assert list(caps) == sorted(caps, reverse=True) and caps[0] > caps[-1]
        assert sum(caps) == 16 * average_capacity(0.2, VAR_256)


# -- our JSON format ---------------------------------------------------------------------------------------------
def test_plan_json_round_trip(tmp_path):
    plan = rule_plan(VAR_256, 16, 0.1, [0, 5], model="var-d16")
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == "scalekv-plan/1" and data["model"] == "var-d16" and data["budget"] == 0.1
    assert [(s["h"], s["w"]) for s in data["scales"]] == [(p.h, p.w) for p in VAR_256]
    assert data["scales"][5]["drafter"][0] == 1 and data["provenance"]["rule"] == "scalekv-linear"
    assert load_plan(path) == plan
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def _valid() -> dict:
    return rule_plan(VAR_256, 4, 0.2, [0]).to_dict()


def _edit(fn):
    data = _valid()
    fn(data)
    return data


MALFORMED = [
    ("not json", "{oops", "not valid JSON"),
    ("no format", _edit(lambda d: d.pop("format")), "format"),
    ("no scales", _edit(lambda d: d.pop("scales")), "missing fields ['scales']"),
    ("short row", _edit(lambda d: d["scales"][3]["capacity"].pop()), "3 capacities"),
    ("over held", _edit(lambda d: d["scales"][2].__setitem__("capacity", [15, 14, 14, 14])), "capacity 15 at scale 2"),
    ("zero", _edit(lambda d: d["scales"][6]["capacity"].__setitem__(1, 0)), "capacity 0 at scale 6"),
    ("float", _edit(lambda d: d["scales"][6]["capacity"].__setitem__(1, 3.5)), "expected an integer"),
    ("last cut", _edit(lambda d: d["scales"][-1]["capacity"].__setitem__(0, 5)), "never compressed"),
    ("flags", _edit(lambda d: d["scales"][5]["drafter"].__setitem__(0, 2)), "drafter flags must be 0 or 1"),
    ("budget", _edit(lambda d: d.__setitem__("budget", 1.5)), "budget=1.5"),
    ("size", _edit(lambda d: d["scales"][1].__setitem__("h", 0)), "scale 1 has size 0x2"),
]


@pytest.mark.parametrize("label, content, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_plan_files(tmp_path, label, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match="plan.json") as err:
        load_plan(path)
    assert message in str(err.value)


def _released_edit(fn):
    data = json.loads((PLANS_DIR / "infinity_2b_10pct.json").read_text())
    fn(data)
    return data


RELEASED_MALFORMED = [
    ("high", _released_edit(lambda d: d["Scale 9"].__setitem__("High", 3)), "High = 3"),
    ("gap", _released_edit(lambda d: d.pop("Scale 11")), "expected every one from 7 to 11"),
    ("last", _released_edit(lambda d: d.__setitem__("Scale 14", copy.deepcopy(d["Scale 13"]))), "never the last"),
    ("blocks", _released_edit(lambda d: d["Scale 10"].pop("Block 31")), "has 31 blocks"),
    ("key", _released_edit(lambda d: d.__setitem__("Scale x", {})), 'expected "Scale N"'),
    ("too big", _released_edit(lambda d: d["Scale 9"].__setitem__("Max", 950)), "capacity 950 at scale 7"),
]


@pytest.mark.parametrize("label, content, message", RELEASED_MALFORMED, ids=[m[0] for m in RELEASED_MALFORMED])
def test_malformed_released_files(tmp_path, label, content, message):
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="budget.json") as err:
        load_plan(path)
    assert message in str(err.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(tmp_path / "nope.json")


# -- plans against a model ----------------------------------------------------------------------------------------
def test_plan_for_another_schedule_or_depth_is_refused():
    pipe = tiny_pipeline(depth=4)
    released = ScaleKV(plan=PLANS_DIR / "infinity_2b_10pct.json")
    with pytest.raises(ValueError, match=r"made for the schedule \[1x1, 2x2, 4x4.*but the model runs \[1x1, 2x2, 3x3"):
        pipe.generate([1], cache=released)
    other = rule_plan(pipe.model.cfg.scales, 3, 0.2, [0])
    with pytest.raises(ValueError, match="has 3 layers, but the model has 4"):
        pipe.generate([1], cache=ScaleKV(plan=other))


def test_scalekv_with_a_plan_object_follows_it_exactly():
    pipe = tiny_pipeline(depth=4)
    plan = rule_plan(pipe.model.cfg.scales, 4, 0.2, {2: [3], 3: [3], 4: [1]}, model="tiny")
    cache = ScaleKV(budget=0.2, plan=plan)
    gen = pipe.generate([1, 2], cache=cache)
    assert [r.cache_lengths for r in gen.scales[:-1]] == [list(c) for c in plan.capacities[:-1]]
    assert gen.scales[-1].cache_lengths == [0] * 4  # the last scale attends over the plan's last row, then drops it
    with pytest.raises(ValueError, match="made for budget 0.2"):
        ScaleKV(budget=0.1, plan=plan)
    assert ScaleKV(plan=PLANS_DIR / "infinity_2b_10pct.json").budget == 0.1


def test_released_plan_runs_on_its_schedule():
    """A layout with the Infinity 1024x1024 schedule accepts the released plan (no model needed for that)."""
    plan = load_plan(PLANS_DIR / "infinity_2b_10pct.json")
    lay = CacheLayout(32, 2, 4, make_scales(INFINITY_1M_SQUARE), rows=2, cond_rows=1)
    cache = ScaleKV(plan=plan)
    cache.reset(lay)
    assert [cache.capacity(layer, lay.scales[7]) for layer in (0, 1, 23)] == [920, 632, 920]
    assert isinstance(cache.plan, Plan)


# -- `scalekv plan make` ------------------------------------------------------------------------------------------
def test_plan_make_then_generate_with_it(tmp_path, capsys):
    path = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "make",
            "--schedule",
            "1x1,2x2,3x3,4x4,5x5,6x6",
            "--layers",
            "4",
            "--budget",
            "0.2",
            "--drafters",
            "0",
            "--out",
            str(path),
        ]
    )
    assert rc == 0
    plan = load_plan(path)
    assert plan == rule_plan(make_scales([(p, p) for p in range(1, 7)]), 4, 0.2, [0])
    gen = tiny_pipeline(depth=4).generate([3], cache=ScaleKV(budget=0.2, plan=path))
    assert [r.cache_lengths for r in gen.scales[:-1]] == [list(c) for c in plan.capacities[:-1]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "var-d99", "--budget", "0.1", "--drafters", "0"], "var-d99"),
        (["--model", "var-d16", "--budget", "0", "--drafters", "0"], "budget=0.0"),
        (["--model", "var-d16", "--budget", "0.1", "--drafters", "a,b"], "--drafters 'a,b'"),
        (["--schedule", "1x1,2", "--layers", "2", "--budget", "0.1", "--drafters", "0"], "--schedule '1x1,2'"),
        (["--model", "var-d16", "--budget", "0.1", "--drafters", "16"], "0..15"),
    ],
)
def test_plan_make_errors_write_nothing(tmp_path, capsys, args, message):
    path = tmp_path / "plan.json"
    assert main(["plan", "make", *args, "--out", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not path.exists()
