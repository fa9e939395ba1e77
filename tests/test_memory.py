"""The KV store: in place, allocated once, the last map never stored, compute-dtype storage, accounting."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from scalekv.cache import POLICIES, KVCache, KVStore, make_cache
from scalekv.cache.store import ConcatStore, arena_tokens

from .helpers import HEAD_AWARE_KWARGS, tiny_pipeline
from .test_infinity_policies import SCHEDULE, policy_kwargs, random_text
from .test_infinity_policies import tiny_pipeline as tiny_infinity


def kwargs_for(name: str, depth: int, budget: float) -> dict:
    if name == "full":
        return {}
    kw = {"budget": budget}
    if "drafters" in inspect.signature(POLICIES[name]).parameters:
        kw["drafters"] = [0, depth - 1]
    kw.update(HEAD_AWARE_KWARGS.get(name, {}))
    return kw


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_images_are_bit_identical_to_a_concatenating_store(name):
    """Writing in place, attending over views and never storing the last map change no bit of any image."""
    if POLICIES[name].default_store is not KVStore:  # per-head policies: HeadStore == KVStore is in test_head_aware
        pytest.skip(f"{name} needs per-head storage and source tags, which the concatenating store has not")
    pipe = tiny_pipeline(depth=3)
    for budget in (0.1, 0.3):
        kw = kwargs_for(name, 3, budget)
        a = pipe.generate([1, 2], seed=3, top_k=20, cache=make_cache(name, **kw))
        b = pipe.generate([1, 2], seed=3, top_k=20, cache=make_cache(name, store=ConcatStore, **kw))
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
        if name == "full":
            break
    inf = tiny_infinity(vae_overrides=dict(base_ch=8, groups=8))
    kw = policy_kwargs(name, inf.model.cfg.depth)
    a = inf.generate(random_text([3, 5]), schedule=SCHEDULE, top_k=1, cache=make_cache(name, **kw))
    b = inf.generate(random_text([3, 5]), schedule=SCHEDULE, top_k=1, cache=make_cache(name, store=ConcatStore, **kw))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", ["full", "scalekv", "snapkv", "h2o"])
def test_the_store_is_allocated_once_and_never_reallocated(name):
    pipe = tiny_pipeline(depth=3)
    cache = make_cache(name, **kwargs_for(name, 3, 0.2))
    seen = []
    update = cache.update

    def spy(layer, scale, q, k, v):
        out = update(layer, scale, q, k, v)
        seen.append((cache.store.k.data_ptr(), cache.store.v.data_ptr(), out[0].data_ptr() >= cache.store.k.data_ptr()))
        return out

    cache.update = spy
    gen = pipe.generate([4], seed=0, top_k=20, cache=cache)
    assert len({(a, b) for a, b, _ in seen}) == 1 and all(inside for *_, inside in seen)  # one buffer, views into it
    assert cache.store.k is None and cache.store.v is None  # released before the decoder ran
    assert gen.kv_bytes_peak == cache.peak_nbytes and not hasattr(gen, "cache")


def test_a_plan_the_store_cannot_hold_is_refused_at_reset():
    pipe = tiny_pipeline(depth=3)
    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    probe = make_cache("snapkv", budget=0.2)
    probe.reset(layout)
    need = probe.peak_nbytes
    small = make_cache("snapkv", budget=0.2, store=functools.partial(KVStore, max_bytes=need - 1))
    with pytest.raises(ValueError, match=rf"needs {need} bytes of KV storage.*max_bytes={need - 1}"):
        pipe.generate([4], cache=small)
    assert small.store is None  # nothing was allocated
    fits = make_cache("snapkv", budget=0.2, store=functools.partial(KVStore, max_bytes=need))
    assert pipe.generate([4], cache=fits).kv_bytes_peak == need


def test_a_plan_keeping_no_token_is_refused_by_the_store():
    pipe = tiny_pipeline(depth=2)
    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    held = [[s.end] * 2 for s in layout.scales[:-1]]
    held[-1][1] = 0
    with pytest.raises(ValueError, match="keeps 0 tokens of layer 1 after scale"):
        KVStore(layout, held)


def test_layers_must_come_in_order():
    pipe = tiny_pipeline(depth=2)
    layout = pipe.model.cache_layout(rows=2, cond_rows=1)
    cache = KVCache()
    cache.reset(layout)
    scale = layout.scales[0]
    x = torch.zeros(2, layout.num_heads, 1, layout.head_dim)
    with pytest.raises(RuntimeError, match="layer 1 opened while layer 0 is due"):
        cache.update(1, scale, x, x, x)


def test_keys_and_values_are_stored_in_the_autocast_dtype():
    pipe = tiny_pipeline(depth=2)
    cache = KVCache()
    dtypes = []
    update = cache.update

    def spy(layer, scale, q, k, v):
        out = update(layer, scale, q, k, v)
        dtypes.append((k.dtype, v.dtype, out[0].dtype, out[1].dtype))
        return out

    cache.update = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = pipe.generate([1], seed=0, top_k=20, cache=cache)
    assert {d[2:] for d in dtypes} == {(torch.bfloat16, torch.bfloat16)}  # stored as the attention computes
    assert pipe.model.pos_start.dtype == torch.float32  # though the weights are float32
    assert gen.kv_bytes_reference == cache.layout.num_layers * cache.layout.total_tokens * cache.layout.token_bytes
    assert cache.layout.token_bytes == 2 * 2 * pipe.model.cfg.embed_dim * 2  # K and V, 2 rows, bf16


def test_arena_size_is_the_most_tokens_alive_at_once():
    # two layers, scales of 1, 4 and 9 tokens; layer 0 keeps 1 then 3, layer 1 keeps 1 then 2
    held = [[1, 1], [3, 2]]
    # scale 1, layer 0: waiting 1 + 1, map 4, done 0 -> 6; scale 2 (last), layer 0: 3 + 2 + 9 = 14
    assert arena_tokens(held, [1, 4, 9]) == 14
    assert arena_tokens([[1, 1], [5, 5]], [1, 4, 9]) == 19  # the full cache: every history plus one map
