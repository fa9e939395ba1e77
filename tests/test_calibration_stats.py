"""The streamed attention statistics equal a direct computation and stay bounded in memory."""

from __future__ import annotations

import pytest
import torch

from scalekv.calibration.stats import AttentionStatsCache, attention_shares

from .helpers import tiny_pipeline


def direct_shares(q, k, history, scale, top_k):
    probs = (scale * q @ k.transpose(-1, -2)).softmax(-1).mean(dim=1)  # (rows, n, L) head average
    current = probs[..., history:].sum()
    kk = min(top_k, history)
    topk = probs[..., :history].topk(kk, dim=-1).values.sum() if kk else torch.tensor(0.0)
    return current.item(), topk.item()


@pytest.mark.parametrize("query_chunk, head_chunk", [(1, 1), (3, 2), (7, 3), (1000, 1000)])
@pytest.mark.parametrize("history, top_k", [(0, 4), (5, 3), (20, 50)])
def test_chunked_shares_equal_direct(query_chunk, head_chunk, history, top_k):
    g = torch.Generator().manual_seed(history + top_k)
    rows, heads, n, d = 4, 3, 9, 8
    q = torch.randn(rows, heads, n, d, generator=g)
    k = torch.randn(rows, heads, history + n, d, generator=g)
    got = attention_shares(q, k, history, 0.5, top_k, query_chunk, head_chunk)
    want = direct_shares(q, k, history, 0.5, top_k)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_collector_measures_every_layer_and_scale_and_accumulates():
    pipe = tiny_pipeline()
    cfg = pipe.model.cfg
    stats = AttentionStatsCache(top_k=10, query_chunk=5, head_chunk=1)
    first = pipe.generate([1, 2], cache=stats, seed=0)
    current, topk = stats.means()
    assert current.shape == topk.shape == (len(cfg.patch_nums), cfg.depth)
    torch.testing.assert_close(current[0], torch.ones(cfg.depth, dtype=torch.float64))  # scale 0 has no history
    assert torch.all(topk[0] == 0)
    assert torch.all((current + topk) <= 1 + 1e-6) and torch.all(current > 0)
    counts = stats.count.clone()
    second = pipe.generate([1, 2], cache=stats, seed=0)
    torch.testing.assert_close(stats.count, 2 * counts)
    again_current, again_topk = stats.means()
    torch.testing.assert_close(again_current, current)  # the same inputs twice leave the means unchanged
    assert torch.equal(first.images, second.images)  # measuring never changes what is generated


def test_collector_refuses_a_different_schedule():
    stats = AttentionStatsCache(top_k=4)
    tiny_pipeline().generate([1], cache=stats)
    with pytest.raises(ValueError, match="collected for"):
        tiny_pipeline(patch_nums=(1, 2, 3, 4, 5)).generate([1], cache=stats)


def test_bad_settings():
    with pytest.raises(ValueError, match="top_k=0"):
        AttentionStatsCache(top_k=0)
    with pytest.raises(ValueError, match="chunk"):
        AttentionStatsCache(top_k=3, query_chunk=0)
