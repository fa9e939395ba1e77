"""Every registered cache policy on Infinity, and the released ScaleKV budget files on the 1024x1024 schedule."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from scalekv.cache import POLICIES, make_cache
from scalekv.models.infinity import Infinity
from scalekv.schedules import ScaleSchedule, get_schedule

from .helpers import HEAD_AWARE_KWARGS
from .test_infinity import random_text, tiny_config, tiny_pipeline

SCHEDULE = ScaleSchedule(1.0, "first 6 of 1:1", get_schedule(1.0, "1M").sizes[:6], (64, 64))  # 265 tokens
RELEASED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "budgets"
BUDGET = 0.3


def policy_kwargs(name: str, depth: int) -> dict:
    """Arguments for any registered policy: a budget if it takes one, and drafters for a rule-based plan."""
    params = inspect.signature(POLICIES[name]).parameters
    kwargs = {}
    if name != "full" and "budget" in params:
        kwargs["budget"] = BUDGET
    if "drafters" in params:
        kwargs["drafters"] = [0, depth - 1]
    kwargs.update(HEAD_AWARE_KWARGS.get(name, {}))
    return kwargs


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_runs_on_infinity(name):
    pipe = tiny_pipeline(vae_overrides=dict(base_ch=8, groups=8))  # a cheap decoder: the cache is under test
    cfg = pipe.model.cfg
    cache = make_cache(name, **policy_kwargs(name, cfg.depth))
    gen = pipe.generate(random_text([3, 5]), schedule=SCHEDULE, top_k=1, cache=cache)
    assert gen.images.shape == (2, 3, 192, 192)
    assert torch.isfinite(gen.images).all()
    rows, elem = 4, 4  # two prompts with CFG, float32
    full_final = SCHEDULE.total_tokens
    before = [0] * cfg.depth
    for rec, scale in zip(gen.scales, SCHEDULE.scales, strict=True):
        for layer, length in enumerate(rec.cache_lengths):
            held = before[layer] + scale.length  # what the layer attended over at this scale
            cap = None if scale.is_last else cache.capacity(layer, scale)
            if isinstance(cap, tuple):  # per-head capacities (capped at what each head holds): the layer's mean
                cap = sum(cap) / len(cap)
            expected = 0 if scale.is_last else (held if cap is None else min(cap, held))  # the last map is dropped
            assert length == expected, (layer, scale.index)
        before = rec.cache_lengths
        # SPEC §4 accounting: K and V, every layer, every row, the tokens held, all channels
        assert rec.kv_bytes == 2 * rows * sum(rec.cache_lengths) * cfg.embed_dim * elem
    assert gen.kv_bytes_reference == 2 * cfg.depth * rows * full_final * cfg.embed_dim * elem
    assert gen.kv_bytes_history == gen.scales[-2].kv_bytes
    if name == "full":
        assert gen.scales[-2].cache_lengths == [SCHEDULE.scales[-1].start] * cfg.depth
    else:
        assert sum(gen.scales[-2].cache_lengths) < cfg.depth * SCHEDULE.scales[-2].end  # something was dropped


@pytest.mark.parametrize("model, depth", [("infinity_2b_10pct", 32), ("infinity_8b_10pct", 40)])
def test_released_budget_files_give_their_capacities_on_the_1m_schedule(model, depth):
    """ScaleKV with a released file keeps, after the scale of index N-2, "Max" tokens in the layers flagged
    "Block i": 1 and "Min" in the others, for every "Scale N" entry; before the first entry nothing is dropped."""
    path = RELEASED / f"{model}.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    released = json.loads(path.read_text())
    schedule = get_schedule(1.0, "1M")
    with torch.device("meta"):
        layout = Infinity(tiny_config(depth=depth, block_chunks=8), init_weights=False).cache_layout(
            schedule, rows=2, cond_rows=1
        )
    # the store holds the small CPU tensors below: 2 rows, 1 head of 4 channels
    layout = dataclasses.replace(layout, num_heads=1, head_dim=4, device=torch.device("cpu"))
    cache = make_cache("scalekv", plan=str(path))
    cache.reset(layout)
    gen = torch.Generator().manual_seed(0)
    for scale in schedule.scales[:-1]:  # the last scale only appends
        q = torch.randn(2, 1, scale.length, 4, generator=gen)
        for layer in range(depth):
            cache.update(layer, scale, q, q, q)
            cache.compress(layer, scale, q)
        entry = released.get(f"Scale {scale.index + 2}")
        if entry is not None:
            expected = [entry["Max"] if entry[f"Block {i}"] == 1 else entry["Min"] for i in range(depth)]
            assert cache.lengths() == expected, f"after scale {scale.index}"
            assert sum(expected) == 650 * depth  # the layer average of the 10% plan
        else:
            assert cache.lengths() == [scale.end] * depth, f"after scale {scale.index}"


def test_scalekv_defaults_to_the_released_plan_only_where_it_applies():
    from scalekv.hub import default_plan

    one_m = get_schedule(1.0, "1M")
    assert default_plan("infinity-2b", 0.1, schedule=one_m).name == "infinity_2b_10pct.json"
    assert default_plan("infinity-8b", None, schedule=one_m).name == "infinity_8b_10pct.json"
    assert default_plan("infinity-2b", 0.2, schedule=one_m) is None
    assert default_plan("infinity-2b", 0.1, schedule=get_schedule(1.0, "0.25M")) is None
    assert default_plan("infinity", 0.1, schedule=one_m) is None
