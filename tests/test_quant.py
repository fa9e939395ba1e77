"""Quantised KV storage (kv_bits 8 and 4) under every policy: codecs, byte accounting, images."""

from __future__ import annotations

import pytest
import torch

from scalekv.cache import POLICIES, HeadStore, KVStore, make_cache
from scalekv.cache.quant_store import (
    QuantizedKVStore,
    dequantize,
    pack4,
    quant_token_bytes,
    quantize,
    unpack4,
)
from scalekv.metrics import psnr
from tests.helpers import HEAD_AWARE_KWARGS, tiny_pipeline


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.linspace(0.1, 5, 64)
    codes, scale, zero = quantize(x, bits, 32)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (64 if bits == 8 else 32)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape[-1] == 2
    y = dequantize(codes, scale, zero, bits, torch.float32)
    step = scale.float().repeat_interleave(32, dim=-1)
    err = (y - x).abs()
    # half a step from rounding, plus fp16 rounding of the scale and zero point
    assert (err <= 0.5 * step + 2e-3 * x.abs().amax()).all()
    assert err.max() > 0  # quantisation does lose something
    rel = (err.norm() / x.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.15)
    # re-quantising a dequantised token gives its codes back: carrying a token on does not degrade it further
    again = quantize(y, bits, 32)
    assert (dequantize(*again, bits, torch.float32) - y).abs().max() <= 1e-3 * x.abs().amax()


def test_four_bit_packing_is_exact():
    q = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack4(q)
    assert packed.shape == (3, 5, 4)
    assert torch.equal(packed[0, 0, 0], q[0, 0, 0] | (q[0, 0, 1] << 4))
    assert torch.equal(unpack4(packed), q)
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack4(unpack4(every.view(1, -1))).view(-1), every)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_dequantize_exactly(bits):
    x = torch.full((1, 1, 4, 32), 0.75)
    assert torch.equal(dequantize(*quantize(x, bits, 32), bits, torch.float32), x)


def _run(pipe, name, labels=(0, 1, 2, 3), **kw):
    budget = {} if name == "full" else {"budget": 0.3}
    if name == "scalekv":
        budget["drafters"] = [0]
    cache = make_cache(name, **budget, **HEAD_AWARE_KWARGS.get(name, {}), **kw)
    gen = pipe.generate(list(labels), cache=cache, seed=0, cfg=1.5, top_k=0, top_p=0.0, greedy=True)
    return gen, cache


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_bytes_are_accounted_exactly(pipe, bits):
    gen, cache = _run(pipe, "snapkv", kv_bits=bits, kv_sinks=0)  # every token at `bits` (sinks: the next test)
    store = cache.store
    assert isinstance(store, QuantizedKVStore)
    lay = cache.layout
    tok = quant_token_bytes(lay.rows, lay.num_heads, lay.head_dim, bits, min(32, lay.head_dim))
    # recount: payload bytes of K and V, plus fp16 scale and zero per group of 32
    groups = lay.head_dim // min(32, lay.head_dim)
    recount = 2 * lay.rows * lay.num_heads * (lay.head_dim * bits // 8 + 2 * groups + 2 * groups)
    assert tok == recount == store.token_bytes
    for k, row in enumerate(cache.scale_lengths[:-1]):
        assert cache.scale_nbytes[k] == [n * tok for n in row]
    assert gen.stats()["kv_bytes_history"] == sum(cache.scale_lengths[-2]) * tok
    fresh = QuantizedKVStore(lay, cache.held, bits=bits, sinks=0)  # the generation released its buffers: recount
    buffers = sum(t.numel() * t.element_size() for la in fresh.layers for p in la.parts for t in p.buffers)
    assert buffers == store.allocated_bytes == sum(max(r[l] for r in cache.held) for l in range(lay.num_layers)) * tok
    work = 2 * fresh.wk.numel() * fresh.wk.element_size()
    assert store.peak_bytes == buffers + work == gen.stats()["kv_bytes_peak"]
    # 16 bits: the tiny model computes in float32, so 8 bits hold about a quarter of the history
    ref, _ = _run(pipe, "snapkv")
    ratio = gen.stats()["kv_bytes_history"] / ref.stats()["kv_bytes_history"]
    assert ratio == pytest.approx(tok / lay.token_bytes)
    assert ratio < (0.4 if bits == 8 else 0.25)


def test_sixteen_bits_is_todays_store_bit_for_bit(pipe):
    plain, cache0 = _run(pipe, "scalekv")
    sixteen, cache16 = _run(pipe, "scalekv", kv_bits=16)
    assert type(cache16.store) is KVStore and type(cache0.store) is KVStore
    assert torch.equal(plain.images, sixteen.images)
    assert plain.stats()["kv_bytes_peak"] == sixteen.stats()["kv_bytes_peak"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_quantised_close_to_sixteen_bits(pipe, name):
    """Every policy: the per-layer ones on one quantised store, the per-head ones (HACK, AMS-KV, HeatKV) on a
    per-head store whose every head's arena is quantised."""
    ref, _ = _run(pipe, name)
    q8, c8 = _run(pipe, name, kv_bits=8)
    q4, c4 = _run(pipe, name, kv_bits=4)
    for cache, bits in ((c8, 8), (c4, 4)):
        per_head = POLICIES[name].default_store is HeadStore
        assert isinstance(cache.store, HeadStore) == per_head
        arenas = cache.store.per_head if per_head else [cache.store]
        assert all(isinstance(a, QuantizedKVStore) and a.bits == bits for a in arenas)
    for gen in (q8, q4):
        assert torch.isfinite(gen.images).all() and gen.images.shape == ref.images.shape
    p8, p4 = psnr(q8.images, ref.images).mean().item(), psnr(q4.images, ref.images).mean().item()
    assert p8 > 45, p8
    assert p4 > 30, p4
    assert c8.scale_lengths == c4.scale_lengths  # quantisation never changes what the plan keeps


def test_attention_sees_current_map_at_full_precision(pipe):
    from scalekv.cache import CacheLayout, make_scales

    layout = CacheLayout(1, 1, 32, make_scales([(1, 1), (2, 2), (2, 2)]), rows=1, cond_rows=1)
    cache = make_cache("full", kv_bits=4)
    cache.reset(layout)
    s0, s1 = layout.scales[:2]
    k0, v0 = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    ka, va = cache.update(0, s0, k0, k0, v0)
    assert torch.equal(ka, k0) and torch.equal(va, v0)
    cache.compress(0, s0, k0)
    k1, v1 = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32)
    ka, va = cache.update(0, s1, k1, k1, v1)
    assert ka.shape[2] == 5 and torch.equal(ka[:, :, 1:], k1) and torch.equal(va[:, :, 1:], v1)
    assert not torch.equal(ka[:, :, :1], k0)  # the history is the dequantised one
    assert torch.allclose(ka[:, :, :1], k0, atol=0.5)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="kv_bits=3"):
        make_cache("full", kv_bits=3)
    with pytest.raises(ValueError, match="kv_bits=True"):
        make_cache("snapkv", budget=0.1, kv_bits=True)
    pipe = tiny_pipeline(seed=0)  # head_dim 32
    with pytest.raises(ValueError, match="kv_group=12"):
        _run(pipe, "full", kv_bits=8, kv_group=12)
    with pytest.raises(ValueError, match="kv_group=0"):
        make_cache("full", kv_bits=8, kv_group=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_sink_tokens_are_stored_one_step_finer_and_counted(pipe, bits):
    from scalekv.cache import CacheLayout, make_scales
    from scalekv.cache.quant_store import quant_bytes

    gen, cache = _run(pipe, "snapkv", kv_bits=bits)  # default: one sink token per (row, head)
    store, lay = cache.store, cache.layout
    assert store.sinks == 1 and store.sink_bits == {8: 16, 4: 8}[bits] and store.token_bytes is None
    assert store.codec_seconds > 0  # quantising and dequantising are timed on CPU (benchmarks' codec share)
    args = (lay.rows, lay.num_heads, lay.head_dim)
    sink = lay.token_bytes if bits == 8 else quant_bytes(1, *args, 8, 32)
    for k, row in enumerate(cache.scale_lengths[:-1]):
        assert cache.scale_nbytes[k] == [sink + quant_bytes(n - 1, *args, bits, 32) for n in row]
    fresh = QuantizedKVStore(lay, cache.held, bits=bits)
    buffers = sum(t.numel() * t.element_size() for la in fresh.layers for p in la.parts for t in p.buffers)
    assert buffers == store.allocated_bytes and store.peak_bytes == gen.stats()["kv_bytes_peak"]
    # on a layer: the first token held comes back at sink precision (exactly at 8 bits), the others at `bits`
    layout = CacheLayout(1, 2, 32, make_scales([(1, 1), (2, 2), (2, 2)]), rows=1, cond_rows=1)
    c = make_cache("full", kv_bits=bits, kv_sinks=2)
    c.reset(layout)
    s0, s1 = layout.scales[:2]
    g = torch.Generator().manual_seed(3)
    k0, v0 = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
    c.update(0, s0, k0, k0, v0)
    c.compress(0, s0, k0)
    k1, v1 = torch.randn(1, 2, 4, 32, generator=g), torch.randn(1, 2, 4, 32, generator=g)
    c.update(0, s1, k1, k1, v1)
    c.compress(0, s1, k1)
    kept = torch.cat((k0, k1), dim=2)
    err = (c.layers[0].k - kept).abs().amax(dim=(0, 1, 3))  # per token
    if bits == 8:
        assert torch.equal(c.layers[0].k[:, :, :2], kept[:, :, :2]) and (err[2:] > 0).all()
    else:
        assert err[:2].max() < err[2:].min() / 4  # 8-bit steps are 17x finer than 4-bit ones
    assert c.layers[0].nbytes == c.store.bytes_for(5)
    assert c.store.bytes_for(5) == (2 * layout.token_bytes if bits == 8 else quant_bytes(2, 1, 2, 32, 8, 32)) + (
        quant_bytes(3, 1, 2, 32, bits, 32)
    )
    with pytest.raises(ValueError, match="kv_sinks=-1"):
        make_cache("full", kv_bits=4, kv_sinks=-1)
    with pytest.raises(ValueError, match="kv_sinks=1"):
        make_cache("full", kv_sinks=1)  # only with 8 or 4 bits


def test_group_option_changes_bytes(pipe):
    _, c32 = _run(pipe, "full", kv_bits=8, kv_sinks=0)
    _, c16 = _run(pipe, "full", kv_bits=8, kv_group=16, kv_sinks=0)
    assert c16.store.group == 16 and c32.store.group == 32
    assert c16.store.token_bytes > c32.store.token_bytes


def test_generate_kv_bits_4_on_the_demo_model_meets_the_memory_targets(tmp_path):
    import json

    from scalekv.cli import main

    out = tmp_path / "q4"
    args = ["generate", "--model", "demo", "--policy", "scalekv", "--budget", "0.1", "--labels", "0,1,2,3"]
    assert main([*args, "--kv-bits", "4", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kv_bits"] == 4
    assert stats["kv_history_ratio"] <= 0.015 and stats["kv_peak_ratio"] <= 0.10
    assert main([*args, "--out", str(tmp_path / "q16")]) == 0
    full = json.loads((tmp_path / "q16" / "stats.json").read_text())
    assert full["kv_bits"] == 16 and full["kv_history_ratio"] > 4 * stats["kv_history_ratio"]
    with pytest.raises(SystemExit):
        main([*args, "--kv-bits", "3", "--out", str(tmp_path / "bad")])


def test_demo_rows_take_kv_bits_and_keep_a_16_bit_reference():
    from scalekv.commands.demo import run_demo
    from scalekv.hub import default_sampling, load_pipeline

    pipe = load_pipeline("demo")
    rows = run_demo(pipe, [0, 1], 0, default_sampling("demo"), model="demo", weights=None, kv_bits=4)
    full, rest = rows[0], rows[1:]
    assert "kv_bits" not in full.options and full.stats["kv_history_ratio"] > 0.5
    for r in rest:
        assert r.options["kv_bits"] == 4 and "kv_bits=4" in r.label
        assert r.stats["kv_history_ratio"] < 0.2 * r.budget  # 16 bits hold about 0.65 x budget on this model
        assert 15 < r.psnr < 100


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_round_trip_handles_a_short_last_group(bits):
    from scalekv.cache.quant_store import dequantize_channels, quantize_channels

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 45, 16, generator=g) * torch.linspace(0.1, 8, 16)  # outlier channels
    codes, scale, zero = quantize_channels(x, bits, 32)
    assert codes.shape == (2, 3, 45, 16 * bits // 8) and scale.shape == zero.shape == (2, 3, 2, 16)
    y = dequantize_channels(codes, scale, zero, bits, torch.float32, 32)
    step = scale.float().repeat_interleave(32, dim=-2)[:, :, :45]
    assert ((y - x).abs() <= 0.5 * step + 2e-3 * x.abs().amax()).all()
    # per channel, an outlier channel does not widen the other channels' steps, unlike per-token groups
    tok = dequantize(*quantize(x, bits, 16), bits, torch.float32)
    assert (y - x)[..., :4].abs().mean() < (tok - x)[..., :4].abs().mean()


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_keys_run_and_count_their_bytes(pipe, bits):
    from scalekv.cache.quant_store import quant_bytes

    ref, _ = _run(pipe, "snapkv")
    gen, cache = _run(pipe, "snapkv", kv_bits=bits, kv_keys="channel", kv_sinks=0)
    store, lay = cache.store, cache.layout
    assert store.keys == "channel" and torch.isfinite(gen.images).all()
    assert psnr(gen.images, ref.images).mean().item() > (45 if bits == 8 else 30)
    rh, d = lay.rows * lay.num_heads, lay.head_dim
    for k, row in enumerate(cache.scale_lengths[:-1]):
        # values per token (payload + scale + zero per 32 channels), keys payload + scale + zero per channel per
        # started group of 32 tokens
        expect = [rh * (n * (d * bits // 8 + 4 * (d // 32)) + n * d * bits // 8 + 4 * d * -(-n // 32)) for n in row]
        assert cache.scale_nbytes[k] == expect
        assert expect == [quant_bytes(n, lay.rows, lay.num_heads, d, bits, 32, "channel") for n in row]
    fresh = QuantizedKVStore(lay, cache.held, bits=bits, keys="channel", sinks=0)
    buffers = sum(t.numel() * t.element_size() for la in fresh.layers for p in la.parts for t in p.buffers)
    assert store.allocated_bytes == buffers and store.peak_bytes == gen.stats()["kv_bytes_peak"]
    with pytest.raises(ValueError, match="kv_keys='row'"):
        make_cache("full", kv_bits=8, kv_keys="row")
    with pytest.raises(ValueError, match="kv_keys='channel'"):
        make_cache("full", kv_keys="channel")  # only with 8 or 4 bits


@pytest.mark.parametrize("name", ["snapkv", "scalekv"])
def test_infinity_runs_quantised(name):
    from tests.test_infinity import random_text
    from tests.test_infinity import tiny_pipeline as tiny_infinity
    from tests.test_infinity_policies import SCHEDULE, policy_kwargs

    pipe = tiny_infinity(vae_overrides=dict(base_ch=8, groups=8))
    kwargs = policy_kwargs(name, pipe.model.cfg.depth)
    text = random_text([3, 5])
    ref = pipe.generate(text, schedule=SCHEDULE, top_k=1, cache=make_cache(name, **kwargs))
    cache = make_cache(name, kv_bits=8, **kwargs)
    gen = pipe.generate(text, schedule=SCHEDULE, top_k=1, cache=cache)
    assert isinstance(cache.store, QuantizedKVStore) and torch.isfinite(gen.images).all()
    assert gen.kv_bytes_history < 0.4 * ref.kv_bytes_history  # float32 compute: 8 bits + metadata is ~0.28
    assert psnr(gen.images, ref.images).mean().item() > 25


def test_eval_crosses_bit_widths_with_policies_and_budgets_and_resumes(tmp_path):
    import json

    from scalekv.evaluation.report import markdown_table
    from tests.test_eval import CountingPipeline, small_config, unmeasured

    kw = dict(policies=["snapkv"], budgets=[0.3], n=2, batch_size=2, top_k=0, top_p=0.0)
    plain_rows = run_eval_rows(small_config(tmp_path / "plain", **kw))
    config = small_config(tmp_path / "run", kv_bits=[16, 8, 4], **kw)
    first = CountingPipeline(tiny_pipeline(seed=0))
    rows = run_eval_rows(config, first)
    names = [(r["policy"], r["budget"], r["kv_bits"]) for r in rows]
    assert names == [("full", None, 16), ("full", None, 8), ("full", None, 4)] + [
        ("snapkv", 0.3, q) for q in (16, 8, 4)
    ]
    by = {(r["policy"], r["kv_bits"]): r for r in rows}
    # the 16-bit rows are those of a run without kv_bits; the reference stays the 16-bit full cache
    assert unmeasured([by["full", 16], by["snapkv", 16]]) == unmeasured(plain_rows)
    assert by["full", 16]["psnr"] is None and 20 < by["full", 4]["psnr"] < by["full", 8]["psnr"]
    for policy in ("full", "snapkv"):
        assert (
            by[policy, 4]["kv_bytes_history"] < by[policy, 8]["kv_bytes_history"] < by[policy, 16]["kv_bytes_history"]
        )
        assert by[policy, 4]["kv_bytes_reference"] == by[policy, 16]["kv_bytes_reference"]
    assert (tmp_path / "run" / "images" / "snapkv_b0.3_q4").is_dir() and (
        tmp_path / "run" / "images" / "full_q8"
    ).is_dir()
    table = markdown_table(rows)
    assert "| bits |" in table and "| snapkv | 30% | 4 |" in table
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kv_bits"] == [16, 8, 4]
    assert "kv_bits" not in json.loads((tmp_path / "plain" / "config.json").read_text())  # older runs still resume
    again = CountingPipeline(tiny_pipeline(seed=0))
    assert unmeasured(run_eval_rows(config, again)) == unmeasured(rows) and again.calls == 0
    with pytest.raises(ValueError, match="kv_bits"):
        run_eval_rows(small_config(tmp_path / "run", kv_bits=[16, 4], **kw))  # another bit list is another run


def run_eval_rows(config, pipeline=None):
    from scalekv.evaluation import run_eval

    return run_eval(config, pipeline=pipeline if pipeline is not None else tiny_pipeline(seed=0))


def test_eval_refuses_bad_bit_widths_before_any_work(tmp_path):
    from scalekv.cli import main
    from tests.test_eval import small_config

    for bad, match in (
        ([3], "kv_bits 3"),
        ([16, 16], "listed twice"),
        ([], "kv_bits=\\[\\]"),
        ([True], "kv_bits True"),
    ):
        with pytest.raises(ValueError, match=match):
            small_config(tmp_path, kv_bits=bad)
    config = small_config(tmp_path / "run", policies=["snapkv"], policy_options={"snapkv": {"kv_bits": 4}})
    with pytest.raises(ValueError, match="kv_bits=4"):
        run_eval_rows(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["eval", "--model", "demo", "--kv-bits", "16,x", "--out", str(tmp_path / "x")])
