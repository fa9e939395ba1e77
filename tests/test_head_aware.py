"""The per-head store and the head-aware policies (HACK, AMS-KV, HeatKV): equal memory, ragged attention,
calibration."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from scalekv.cache import POLICIES, CacheLayout, HeadStore, KVStore, Plan, make_cache, make_scales
from scalekv.cache.head_store import ragged_attention
from scalekv.cache.heatkv import nested_ranks
from scalekv.cache.plan import INFINITY_1M_SQUARE, average_capacity, first_compressed_scale
from scalekv.calibration.heads import collect_head_stats
from scalekv.cli import main
from scalekv.hub import load_pipeline

from .helpers import HEAD_AWARE_KWARGS, tiny_pipeline

HEAD_AWARE = sorted(HEAD_AWARE_KWARGS)


def policy(name: str, budget: float, **extra):
    kwargs = {"drafters": [0]} if name == "scalekv" else dict(HEAD_AWARE_KWARGS.get(name, {}))
    return make_cache(name, budget=budget, **{**kwargs, **extra})


def run_layer_protocol(cache, lay: CacheLayout, seed: int = 0) -> None:
    """Drive ``cache`` over every scale and layer with random q/k/v, as a model's attention would."""
    g = torch.Generator().manual_seed(seed)
    cache.reset(lay)
    for scale in lay.scales:
        shape = (lay.rows, lay.num_heads, scale.length, lay.head_dim)
        for layer in range(lay.num_layers):
            q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
            cache.attend(layer, scale, q, k, v)
            cache.compress(layer, scale, q)


def layer_means(cache) -> list[float]:
    """Mean tokens per layer after every scale but the last, from the bytes each layer holds."""
    per_token = cache.layout.token_bytes
    return [sum(row) / per_token / cache.layout.num_layers for row in cache.scale_nbytes[:-1]]


def check_equal_memory(name: str, lay: CacheLayout, budget: float, reference_history: int) -> None:
    cache = policy(name, budget)
    run_layer_protocol(cache, lay)
    avg = average_capacity(budget, lay.scales)
    first = first_compressed_scale(lay.scales, avg)
    for k, mean in enumerate(layer_means(cache)):
        if k >= first:
            assert abs(mean - avg) <= 1, (name, k, mean, avg)
    assert abs(cache.history_nbytes - reference_history) <= lay.num_layers * lay.token_bytes


@pytest.mark.parametrize("budget", [0.04, 0.1, 0.2])
def test_every_policy_keeps_b_tokens_per_layer_after_every_compressed_scale(budget):
    """One test over the whole registry: the mean over layers is B (±1 token) after every compressed scale, and
    the history bytes are SnapKV's (±1 token per layer)."""
    lay = CacheLayout(2, 3, 8, make_scales([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8)]), 2, 1)
    snap = policy("snapkv", budget)
    run_layer_protocol(snap, lay)
    for name in sorted(POLICIES):
        if POLICIES[name].compresses:
            check_equal_memory(name, lay, budget, snap.history_nbytes)


def test_infinity_1024_schedule_holds_snapkvs_history_bytes():
    """The 13-scale 1024x1024 schedule (10,521 tokens) at 10%, on the cache alone with random tensors."""
    lay = CacheLayout(2, 2, 4, make_scales(INFINITY_1M_SQUARE), 2, 1)
    snap = policy("snapkv", 0.1)
    run_layer_protocol(snap, lay)
    assert average_capacity(0.1, lay.scales) == 642
    for name in HEAD_AWARE:
        check_equal_memory(name, lay, 0.1, snap.history_nbytes)


def test_head_store_gives_the_per_layer_stores_images_bit_for_bit():
    pipe = tiny_pipeline(depth=3)
    for name in ("snapkv", "full"):
        kw = {} if name == "full" else {"budget": 0.2}
        a = pipe.generate([1, 2], seed=3, top_k=20, cache=make_cache(name, **kw))
        b = pipe.generate([1, 2], seed=3, top_k=20, cache=make_cache(name, store=HeadStore, **kw))
        assert torch.equal(a.images, b.images)
        assert (a.kv_bytes_peak, a.kv_bytes_history) == (b.kv_bytes_peak, b.kv_bytes_history)


@pytest.mark.parametrize("mode", ["auto", "group", "loop", "pad"])
def test_ragged_attention_matches_masked_dense_attention(mode):
    g = torch.Generator().manual_seed(0)
    rows, heads, n, dim, lengths = 2, 5, 6, 8, [9, 4, 9, 12, 4]
    q = torch.randn(rows, heads, n, dim, generator=g)
    ks = [torch.randn(rows, 1, m, dim, generator=g) for m in lengths]
    vs = [torch.randn(rows, 1, m, dim, generator=g) for m in lengths]
    out = ragged_attention(q, ks, vs, 0.3, mode)
    for h in range(heads):
        probs = (0.3 * q[:, h] @ ks[h][:, 0].transpose(-1, -2)).softmax(-1)
        torch.testing.assert_close(out[:, h], probs @ vs[h][:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-call CUDA paths need a GPU")
@pytest.mark.parametrize("mode", ["pad", "flex"])
def test_ragged_attention_one_call_on_cuda(mode):
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [130, 7, 64, 130]
    q = torch.randn(2, 4, 16, 64, device="cuda", generator=g)
    ks = [torch.randn(2, 1, m, 64, device="cuda", generator=g) for m in lengths]
    vs = [torch.randn(2, 1, m, 64, device="cuda", generator=g) for m in lengths]
    torch.testing.assert_close(ragged_attention(q, ks, vs, 1.0, mode), ragged_attention(q, ks, vs, 1.0, "loop"))


def test_heads_hold_their_own_counts_and_memory_is_the_tokens_kept():
    lay = CacheLayout(3, 4, 8, make_scales([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]), 2, 1)
    cache = policy("hack", 0.2, contextual=[[0, 0], [0, 1], [2, 3]])
    run_layer_protocol(cache, lay)
    heads = cache.plan.heads
    assert len(set(heads[-2][0])) > 1  # layer 0 mixes contextual and structural heads
    per_head_token = lay.token_bytes // lay.num_heads
    assert cache.scale_nbytes[-2] == [sum(r) * per_head_token for r in heads[-2]]  # no padding to the longest head
    with pytest.raises(ValueError, match="expected store=scalekv.cache.HeadStore"):
        KVStore(lay, cache.held)


def source_scales_kept(name: str, budget: float, **kw):
    """Per compression: (layer, scale, per head the source scales of the kept tokens (row 0), capacity)."""
    lay = CacheLayout(3, 4, 8, make_scales([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]), 2, 1)
    cache = policy(name, budget, **kw)
    seen = []
    compress = cache.compress

    def spy(layer, scale, q):
        compress(layer, scale, q)
        store = cache.layers[layer]
        if not scale.is_last and store.positions[0] is not None:
            seen.append((layer, scale.index, [store.source_scales(h)[0].tolist() for h in range(4)]))

    cache.compress = spy
    run_layer_protocol(cache, lay)
    return cache, seen


def test_hack_structural_heads_keep_the_first_two_scales_and_the_current_one():
    cache, seen = source_scales_kept("hack", 0.3, contextual=[[layer, 0] for layer in range(3)])
    for _layer, k, per_head in seen:
        for h, src in enumerate(per_head):
            if h and k >= 2 and len(src) >= 5 + (k + 1) ** 2:  # structural and room for both
                assert src.count(0) == 1 and src.count(1) == 4 and src.count(k) == (k + 1) ** 2


def test_ams_kv_locks_the_condensed_scales_and_keeps_the_most_recent():
    cache, seen = source_scales_kept("ams_kv", 0.2)
    for _layer, k, per_head in seen:
        for src in per_head:
            if k == 0:
                continue
            assert src[:5] == [0, 1, 1, 1, 1]  # the two coarsest scales
            rest = src[5:]
            assert rest == sorted(rest) and (not rest or rest[-1] == k)
            assert all(rest.count(s) == (s + 1) ** 2 for s in set(rest) if s != min(rest))  # whole recent scales
    demanding, other = cache.plan.capacities[-2][0], cache.plan.capacities[-2][1]
    assert demanding > other  # layer 0 is the cache-demanding one


def test_heatkv_protects_three_scales_and_its_schedule_is_static():
    cache, seen = source_scales_kept("heatkv", 0.3)
    again, seen_again = source_scales_kept("heatkv", 0.3)
    assert seen == seen_again  # nothing depends on the data
    for _layer, k, per_head in seen:
        for src in per_head:
            assert k < 2 or src[:14] == [0] + [1] * 4 + [2] * 9
    blocks = {tuple(src) for _, _, per in seen for src in per}
    assert len({len(b) for b in blocks}) > 1  # ragged heads
    ranks = nested_ranks(25)
    assert sorted(ranks.tolist()) == list(range(25)) and set(ranks[:1].tolist()) == {0}


def test_calibration_measures_every_head_and_drives_the_policies(tmp_path):
    pipe = tiny_pipeline(depth=2)

    def generate(batch, *, cache, seed):
        return pipe.generate(batch, cache=cache, seed=seed, top_k=20)

    stats = collect_head_stats(generate, [1, 2, 3], batch_size=2, model="tiny")
    lay = pipe.model.cache_layout(rows=2, cond_rows=1)
    assert (stats.num_layers, stats.num_heads) == (lay.num_layers, lay.num_heads)
    sigma, scas = torch.tensor(stats.sigma), torch.tensor(stats.scas)
    assert (sigma > 0).all() and (scas >= 0).all() and (scas[..., -1] == 0).all()
    assert (scas[..., 0] > 0).all() and all(s < 0 for s in stats.similarity)  # a negative distance
    path = stats.save(tmp_path / "stats.json")
    for name in HEAD_AWARE:
        gen = pipe.generate([4], seed=0, top_k=20, cache=make_cache(name, budget=0.2, calibration=path))
        assert gen.kv_bytes_history < gen.kv_bytes_reference
    hack = make_cache("hack", budget=0.2, calibration=path, alpha=0.5)
    hack.reset(lay)
    lowest = torch.argsort(sigma.flatten())[: round(0.5 * sigma.numel())]
    assert set(torch.nonzero(hack.kinds.flatten()).flatten().tolist()) == set(lowest.tolist())


def test_the_cli_writes_the_statistics_the_policies_read(tmp_path):
    out = tmp_path / "demo_stats.json"
    argv = ["calibrate", "--model", "demo", "--method", "hack", "--samples", "1", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    demo = load_pipeline("demo").model.cfg
    assert data["format"] == "scalekv-head-stats/1" and len(data["sigma"]) == demo.depth
    assert all(len(row) == demo.num_heads for row in data["sigma"])


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("hack", {}, "exactly one of calibration"),
        ("hack", {"contextual": [[0, 0]], "alpha": 1.5}, "alpha=1.5"),
        ("hack", {"contextual": [[0]]}, "entries of 2 non-negative integers"),
        ("ams_kv", {"demanding": [0], "ratio": 0.5}, "ratio=0.5"),
        ("heatkv", {}, "exactly one of calibration"),
        ("heatkv", {"seed": -1}, "seed=-1"),
        ("heatkv", {"calibration": "missing.json"}, "does not exist"),
        ("hack", {"contextual": [[0, 0]], "kv_bits": 8, "store": HeadStore}, "a custom store cannot be quantised"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cache(name, budget=0.1, **kwargs)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_per_head_policies_hold_snapkvs_history_bytes(bits):
    """kv_bits on a per-head policy quantises every head's arena alike: the same history bytes as SnapKV at the
    same bits, and how many tokens every layer keeps does not depend on how they are stored."""
    pipe = tiny_pipeline(depth=3)
    snap = pipe.generate([1, 2], seed=3, cache=make_cache("snapkv", budget=0.2, kv_bits=bits))
    for name in HEAD_AWARE:
        plain_cache, cache = policy(name, 0.2), policy(name, 0.2, kv_bits=bits)
        plain = pipe.generate([1, 2], seed=3, cache=plain_cache)
        gen = pipe.generate([1, 2], seed=3, cache=cache)
        assert abs(gen.kv_bytes_history - snap.kv_bytes_history) <= snap.kv_bytes_history // 20, name
        assert gen.kv_bytes_history < plain.kv_bytes_history * (0.6 if bits == 8 else 0.35), name
        assert cache.scale_lengths == plain_cache.scale_lengths, name
        assert torch.isfinite(gen.images).all()


def test_a_calibration_for_another_model_is_refused_at_reset():
    pipe = tiny_pipeline(depth=2)
    demo = load_pipeline("demo").model.cfg
    cache = make_cache("heatkv", budget=0.1, calibration="scalekv/weights/demo/plans/head_stats.json")
    with pytest.raises(ValueError, match=f"{demo.depth} layers x {demo.num_heads} heads"):
        pipe.generate([1], cache=cache)


def test_per_head_plans_round_trip_through_json(tmp_path):
    lay = CacheLayout(3, 4, 8, make_scales([(1, 1), (2, 2), (3, 3), (4, 4)]), 2, 1)
    cache = policy("heatkv", 0.3)
    cache.reset(lay)
    path = cache.plan.save(tmp_path / "p.json")
    back = Plan.from_dict(json.loads(path.read_text()))
    assert back == cache.plan and back.heads is not None
    assert abs(back.average_capacity - average_capacity(0.3, lay.scales)) < 1e-9


def test_a_head_stores_peak_is_the_sum_of_its_heads_arenas():
    lay = CacheLayout(2, 3, 8, make_scales([(1, 1), (2, 2), (3, 3)]), 2, 1)
    held = [[(1, 1, 1)] * 2, [(5, 2, 3)] * 2]
    store = HeadStore(lay, held)
    one = dataclasses.replace(lay, num_heads=1)
    per = [KVStore(one, [[entry[h] for entry in row] for row in held]) for h in range(3)]
    assert store.peak_bytes == sum(s.peak_bytes for s in per) < KVStore(lay, [[1, 1], [5, 5]]).peak_bytes
