"""Layers the VAR and Infinity transformers share, with the official checkpoints' parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.base import KVCache
from ..schedules import Scale


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: the feed-forward block of both official transformers."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class QKVAttention(nn.Module):
    """The self-attention both official transformers share: one fused q/k/v projection with q and v biases (the key
    bias a zero buffer), and an output projection. Subclasses normalise or rotate q and k; :meth:`attend` then hands
    them to the cache (which attends and compresses) or, without a cache, runs masked SDPA."""

    def __init__(self, c: int, num_heads: int, head_dim: int, layer: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.layer = num_heads, head_dim, layer
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = nn.Linear(c, c)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, n, C) to q, k, v, each (B, H, n, head_dim)."""
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        softmax_scale: float,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        scale: Scale | None,
    ) -> torch.Tensor:
        """The attention output projected back, (B, n, C). With a cache, the cache attends (it must have been built
        with this ``softmax_scale``) and then compresses this layer."""
        b, _, n, _ = q.shape
        if cache is not None:
            out = cache.attend(self.layer, scale, q, k, v)
            cache.compress(self.layer, scale, q)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))
