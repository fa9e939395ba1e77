"""Infinity: the text-to-image bitwise next-scale transformer, with the official checkpoints' key names.

Token layout: scale-major, row-major inside a scale; scale ``k`` occupies ``[start_k, start_k + h_k * w_k)``. There
is no absolute position embedding: positions enter only through 2-D RoPE in self-attention, and the scale index
through ``lvl_embed`` added before the first block. The text condition is pooled into the start token and the shared
AdaLN condition, and read by a cross-attention in every block.

Self-attention hands its real queries, keys and values (after cosine normalisation, the learned per-head scale and
RoPE) to a :class:`~scalekv.cache.KVCache` and attends over what the cache returns; the model knows nothing about
compression. The text K/V of every cross-attention are computed once per generation (:meth:`Infinity.text_memory`).

Our modules keep the layers in a flat ``blocks`` list; the official files nest them as
``block_chunks.{c}.module.{j}`` (layer ``c * per_chunk + j``), which :func:`map_infinity_keys` translates explicitly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.base import CacheLayout, KVCache, compute_dtype
from ..checkpoint import CheckpointError
from ..schedules import Scale, ScaleSchedule
from .layers import FFN, QKVAttention


@dataclass(frozen=True)
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048  # C (= D, the condition width)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_channels: int = 2048  # Ct5: width of the T5 features
    text_maxlen: int = 512  # rows of cfg_uncond (the learned empty-text features)
    block_chunks: int = 8  # the official files group layers in this many chunks
    d_vae: int = 32  # transformer input channels per token (VAE bits, x4 with spatial patchify)
    patchify: bool = False  # 8B: the VAE grid is 2x the token grid; bits are pixel-(un)shuffled
    num_levels: int = 15  # rows of lvl_embed
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    cross_attn_bf16: bool = True  # round cross-attention q/k/v and output to bf16, as the reference's flash call

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim}: 2-D RoPE needs a multiple of 4")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible into block_chunks={self.block_chunks}")
        if self.text_pool_heads < 1 or self.embed_dim % self.text_pool_heads:
            raise ValueError(
                f"text pool: {self.text_pool_heads} heads (text_channels {self.text_channels} // "
                f"{self.text_pool_head_split}) must divide embed_dim {self.embed_dim}"
            )
        if self.patchify and self.d_vae % 4:
            raise ValueError(f"d_vae={self.d_vae} with patchify: expected 4 x the VAE's bits")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def text_pool_head_split(self) -> int:
        return 128 if self.embed_dim <= 4096 else 64

    @property
    def text_pool_heads(self) -> int:
        return self.text_channels // self.text_pool_head_split

    @property
    def vocab_size(self) -> int:
        """Head outputs per token: a logit pair per bit."""
        return 2 * self.d_vae

    @property
    def vae_bits(self) -> int:
        """Bits per VAE latent position."""
        return self.d_vae // 4 if self.patchify else self.d_vae

    def to_json(self) -> dict:
        return dict(self.__dict__)


INFINITY_PRESETS: dict[str, InfinityConfig] = {
    "infinity-2b": InfinityConfig(),
    "infinity-8b": InfinityConfig(depth=40, embed_dim=3584, num_heads=28, d_vae=56, patchify=True),
}


# -- text ------------------------------------------------------------------------------------------------------
@dataclass
class TextBatch:
    """T5 features of a batch of prompts, compact: the valid rows of every prompt concatenated in order.

    ``features`` (N, Ct5) float32 with ``N = lens.sum()``; ``lens`` (B,) int64 token counts (``</s>`` included).
    """

    features: torch.Tensor
    lens: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"text features have shape {tuple(self.features.shape)}; expected (N, channels)")
        lens = torch.as_tensor(self.lens)
        if lens.ndim != 1 or lens.numel() == 0 or lens.dtype.is_floating_point or bool((lens < 1).any()):
            raise ValueError(f"text lens {self.lens!r}: expected a non-empty 1-D sequence of positive token counts")
        if int(lens.sum()) != self.features.shape[0]:
            raise ValueError(f"text lens sum to {int(lens.sum())} but features have {self.features.shape[0]} rows")
        self.lens = lens.long()

    @property
    def batch(self) -> int:
        return self.lens.numel()

    def select(self, indices: list[int]) -> TextBatch:
        """The prompts ``indices`` of this batch, in that order."""
        starts = torch.cumsum(self.lens, 0) - self.lens
        rows = [self.features[int(starts[i]) : int(starts[i]) + int(self.lens[i])] for i in indices]
        return TextBatch(torch.cat(rows), self.lens[list(indices)])

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.features.to(device), self.lens.to(device))


def pad_text(x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact rows ``x`` (N, ...) with per-sample counts ``lens`` (B,) -> padded (B, Lmax, ...) and a boolean
    validity mask (B, Lmax). One gather, no loop over samples."""
    lmax = int(lens.max())
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(lmax, device=x.device)
    valid = pos.unsqueeze(0) < lens.to(x.device).unsqueeze(1)
    index = (starts.to(x.device).unsqueeze(1) + pos).clamp_(max=x.shape[0] - 1)
    return x[index], valid


# -- 2-D RoPE -------------------------------------------------------------------------------------------------
def rope_positions(schedule: ScaleSchedule) -> torch.Tensor:
    """Grid coordinates ``(iy, ix)`` of every token, (L, 2) int64, scale-major.

    Every scale ``(h, w)`` is laid onto the template's 1M map ``(uh, uw)``: row ``k`` goes to ``round(k * uh / h)``
    (float32 product, round half to even), likewise for columns. Coordinates depend only on (scale, row, column).
    """
    uh, uw = schedule.rope_extent
    out = []
    for h, w in schedule.sizes:
        iy = (torch.arange(h) * (uh / h)).round().long()
        ix = (torch.arange(w) * (uw / w)).round().long()
        out.append(torch.stack((iy.view(h, 1).expand(h, w), ix.view(1, w).expand(h, w)), dim=-1).reshape(-1, 2))
    return torch.cat(out)


def rope_table(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """cos and sin of the rotation angles, (2, L, head_dim // 2) float32.

    Angles of a token at ``(iy, ix)``: ``[iy * inv_freq, ix * inv_freq]`` (y first) with
    ``inv_freq[i] = base ** (-2i / (head_dim / 2))``; pair ``m`` of a head vector is rotated by angle ``m``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64) / half))
    angles = torch.cat((positions[:, :1].float() * inv_freq, positions[:, 1:].float() * inv_freq), dim=-1)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (..., L, head_dim) by ``table`` (2, L, head_dim // 2)."""
    cos, sin = table[0].to(x.dtype), table[1].to(x.dtype)
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2)


# -- modules --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` (the reference's FastRMSNorm without flash-attn's fused kernel)."""

    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in float32, LN without affine parameters."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


class SelfAttention(QKVAttention):
    """Cosine attention: q and k L2-normalised, q scaled per head by ``exp(min(scale_mul, log 100))``, 2-D RoPE
    on both, softmax with scale 1."""

    def __init__(self, cfg: InfinityConfig, layer: int) -> None:
        super().__init__(cfg.embed_dim, cfg.num_heads, cfg.head_dim, layer)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100.0)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        scale: Scale | None = None,
    ) -> torch.Tensor:
        """``x`` (B, n, C); ``rope`` (2, n, head_dim/2) for these tokens; ``mask`` (n, n) boolean (True = attend)
        for teacher forcing, or ``cache`` + ``scale`` for cached inference. Returns (B, n, C)."""
        q, k, v = self.qkv(x)  # each (B, H, n, hd)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = apply_rope(F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul), rope)
        k = apply_rope(F.normalize(k, dim=-1, eps=1e-12), rope)
        return self.attend(q, k, v, 1.0, mask, cache, scale)


@dataclass
class TextKV:
    """One cross-attention's text keys and values, padded per sample: k, v (B, H, Lmax, hd); mask (B, 1, 1, Lmax)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, for the text pool) to each sample's own text tokens.

    The reference calls flash-attn's varlen kernel after casting q, k and v to bf16 (even in a float32 model); with
    ``bf16=True`` this module rounds q, k, v and the output to bf16 the same way and computes the attention itself in
    float32 with a per-sample block mask (SDPA, vectorised over the batch).
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, *, pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def text_kv(self, text: torch.Tensor, lens: torch.Tensor, bf16: bool) -> TextKV:
        """Project compact text rows ``text`` (N, kv_dim) with per-sample counts ``lens`` (B,) to padded K/V."""
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv, valid = pad_text(kv.view(-1, 2, self.num_heads, self.head_dim), lens)  # (B, Lmax, 2, H, hd)
        if bf16:
            kv = kv.bfloat16().float()
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return TextKV(k, v, valid.view(valid.shape[0], 1, 1, -1))

    def forward(self, x: torch.Tensor | None, kv: TextKV, bf16: bool) -> torch.Tensor:
        """``x`` (B, n, C) queries' inputs, or None for the learned pool query (n = 1). Returns (B, n, C)."""
        b = kv.k.shape[0]
        if x is None:
            q = self.mat_q.unsqueeze(2).expand(b, -1, -1, -1)  # (B, H, 1, hd)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        if bf16:
            q = q.bfloat16().float()
        out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=kv.mask)  # scale head_dim ** -0.5
        if bf16:
            out = out.bfloat16().float()
        return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], -1))


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.text_pool_heads, pool=True)

    def forward(self, text: torch.Tensor, lens: torch.Tensor, bf16: bool) -> torch.Tensor:
        """Compact normalised text (N, Ct5) -> one vector per sample (B, D)."""
        return self.ca(None, self.ca.text_kv(text, lens, bf16), bf16).squeeze(1)


class CrossAttnBlock(nn.Module):
    """``x += g1 * SA(ada_ln(x, s1, b1)); x += CA(ca_norm(x), text); x += g2 * FFN(ada_ln(x, s2, b2))``."""

    def __init__(self, cfg: InfinityConfig, layer: int) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        self.sa = SelfAttention(cfg, layer)
        self.ca = CrossAttention(c, c, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.ffn = FFN(c, cfg.ffn_hidden)

    def forward(
        self, x: torch.Tensor, gss: torch.Tensor, text: TextKV, rope: torch.Tensor, bf16: bool, **attn_kwargs
    ) -> torch.Tensor:
        """``x`` (B, n, C); ``gss`` (B, 1, 6, C) shared AdaLN output; ``text`` this block's text K/V."""
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss).unbind(2)
        x = x + self.sa(ada_layer_norm(x, s1, b1, self.eps), rope, **attn_kwargs).mul_(g1)
        x = x + self.ca(self.ca_norm(x), text, bf16)
        return x + self.ffn(ada_layer_norm(x, s2, b2, self.eps)).mul(g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return ada_layer_norm(x, scale, shift, self.eps)


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(cond.shape[0], 1, 6, -1)


@dataclass
class Condition:
    """Everything derived from the text once per generation; rows are ``[cond; uncond]`` under CFG.

    ``cond`` (R, D) pooled text (start token and head condition); ``gss`` (R, 1, 6, C) shared AdaLN output;
    ``memory`` one :class:`TextKV` per block.
    """

    cond: torch.Tensor
    gss: torch.Tensor
    memory: list[TextKV] = field(repr=False)

    @property
    def rows(self) -> int:
        return self.cond.shape[0]


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig, *, init_weights: bool = True) -> None:
        """``init_weights=False`` skips :meth:`reset_parameters` (for loading a checkpoint right after)."""
        super().__init__()
        self.cfg = cfg
        c, ct5 = cfg.embed_dim, cfg.text_channels
        self.cross_attn_bf16 = cfg.cross_attn_bf16
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.text_norm = RMSNorm(ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.lvl_embed = nn.Embedding(cfg.num_levels, c)
        self.word_embed = nn.Linear(cfg.d_vae, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        self.blocks = nn.ModuleList(CrossAttnBlock(cfg, i) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Random weights of a usable scale (the real ones come from a checkpoint): truncated normal of std
        ``(3 C)^-1/2`` everywhere, AdaLN gammas around 0.5 so that no block is an identity."""
        std = std if std is not None else (1 / self.cfg.embed_dim / 3) ** 0.5
        gen = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():
            if name.endswith("scale_mul_1H11"):
                continue
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen).clamp_(-2, 2) * std)
        with torch.no_grad():
            self.text_norm.weight.fill_(1.0)
            for block in self.blocks:
                block.ada_gss[:, :, :2].add_(0.5)
                block.ca_norm.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    # -- text ------------------------------------------------------------------------------------------------
    def uncond_text(self, lens: torch.Tensor) -> torch.Tensor:
        """Unconditional features for prompts of token counts ``lens``: ``cfg_uncond[:len_i]`` each, compact."""
        if int(lens.max()) > self.cfg.text_maxlen:
            raise ValueError(f"a prompt has {int(lens.max())} tokens; expected at most {self.cfg.text_maxlen}")
        pos = torch.cat([torch.arange(int(n), device=self.device) for n in lens.tolist()])
        return self.cfg_uncond[pos]

    def condition(self, text: TextBatch, *, uncond: bool, negative: TextBatch | None = None) -> Condition:
        """Pool and project the text once. With ``uncond`` the rows become ``[cond; uncond]``, the uncond text
        being ``negative`` if given, else ``cfg_uncond[:len_i]`` per prompt."""
        cfg = self.cfg
        if text.features.shape[1] != cfg.text_channels:
            raise ValueError(f"text features have {text.features.shape[1]} channels; expected {cfg.text_channels}")
        feats, lens = text.features.to(self.device, torch.float32), text.lens.to(self.device)
        if uncond:
            if negative is None:
                neg_feats, neg_lens = self.uncond_text(lens), lens
            else:
                if negative.batch != text.batch:
                    raise ValueError(f"{negative.batch} negative prompts for {text.batch} prompts; expected equal")
                neg_feats, neg_lens = negative.features.to(self.device, torch.float32), negative.lens.to(self.device)
            feats, lens = torch.cat((feats, neg_feats)), torch.cat((lens, neg_lens))
        kv = self.text_norm(feats)
        bf16 = self.cross_attn_bf16
        cond = self.text_proj_for_sos(kv, lens, bf16)
        ca_kv = self.text_proj_for_ca(kv)
        memory = [block.ca.text_kv(ca_kv, lens, bf16) for block in self.blocks]
        return Condition(cond, self.shared_ada_lin(cond.float()), memory)

    # -- pieces shared by teacher forcing and generation -------------------------------------------------------
    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Bit-pair logits (B, n, 2 d) in float32 for hidden states ``h`` (B, n, C) under ``cond`` (B, D)."""
        return self.head(self.head_nm(h.float(), cond.float())).float()

    def first_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The start token of every row, (R, 1, C): pooled text + ``pos_start``."""
        return cond.unsqueeze(1) + self.pos_start.expand(cond.shape[0], 1, -1)

    def rope(self, schedule: ScaleSchedule) -> torch.Tensor:
        """RoPE table (2, L, head_dim/2) of every token of ``schedule``."""
        return rope_table(rope_positions(schedule), self.cfg.head_dim, self.cfg.rope_base).to(self.device)

    def _check_schedule(self, schedule: ScaleSchedule) -> None:
        if len(schedule.sizes) > self.cfg.num_levels:
            raise ValueError(f"schedule has {len(schedule.sizes)} scales; lvl_embed has {self.cfg.num_levels} rows")

    # -- teacher forcing ---------------------------------------------------------------------------------------
    def forward(self, text: TextBatch, x_wo_prefix: torch.Tensor, schedule: ScaleSchedule) -> torch.Tensor:
        """Uncached teacher-forced logits (B, L, 2 d) for ``text`` and next-scale inputs ``x_wo_prefix``
        (B, L - 1, d_vae) under the block-causal mask. No condition dropout (apply it to the text when training)."""
        self._check_schedule(schedule)
        scales = schedule.scales
        if x_wo_prefix.shape[1] != scales[-1].end - 1:
            raise ValueError(f"x_wo_prefix has {x_wo_prefix.shape[1]} tokens; expected {scales[-1].end - 1}")
        c = self.condition(text, uncond=False)
        x = torch.cat((self.first_tokens(c.cond), self.word_embed(x_wo_prefix.float())), dim=1)
        level = torch.cat([torch.full((s.length,), s.index, device=self.device) for s in scales])
        x = x + self.lvl_embed(level)
        mask = level.view(-1, 1) >= level.view(1, -1)
        rope = self.rope(schedule)
        for block, memory in zip(self.blocks, c.memory, strict=True):
            x = block(x, c.gss, memory, rope, self.cross_attn_bf16, mask=mask)
        return self.logits(x, c.cond)

    # -- cached inference, one scale at a time -----------------------------------------------------------------
    def cache_layout(self, schedule: ScaleSchedule, rows: int, cond_rows: int) -> CacheLayout:
        cfg = self.cfg
        p = self.pos_start
        return CacheLayout(
            cfg.depth, cfg.num_heads, cfg.head_dim, schedule.scales, rows, cond_rows, 1.0, compute_dtype(p), p.device
        )

    def step(self, x: torch.Tensor, cond: Condition, cache: KVCache, scale: Scale, rope: torch.Tensor) -> torch.Tensor:
        """Run every block on the tokens ``x`` (R, h*w, C) of ``scale`` against ``cache``; return logits
        (R, h*w, 2 d). ``rope`` is the schedule's full table; this scale takes its own rows of it."""
        self._check_schedule_index(scale)
        x = x + self.lvl_embed.weight[scale.index]
        rope = rope[:, scale.start : scale.end]
        for block, memory in zip(self.blocks, cond.memory, strict=True):
            x = block(x, cond.gss, memory, rope, self.cross_attn_bf16, cache=cache, scale=scale)
        return self.logits(x, cond.cond)

    def _check_schedule_index(self, scale: Scale) -> None:
        if scale.index >= self.cfg.num_levels:
            raise ValueError(f"scale index {scale.index}: lvl_embed has {self.cfg.num_levels} rows")


# -- checkpoints ----------------------------------------------------------------------------------------------
_CHUNK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_FLAT_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def map_infinity_keys(state: Mapping[str, torch.Tensor], cfg: InfinityConfig) -> dict[str, torch.Tensor]:
    """Official names -> ours: ``block_chunks.{c}.module.{j}.X`` becomes ``blocks.{c * per_chunk + j}.X``, where
    ``per_chunk = depth / block_chunks``; a file saved with one chunk (``blocks.{l}.X``) is taken as is. A chunk or
    slot outside the configuration, or two keys landing on one name, raise :class:`CheckpointError`."""
    per_chunk = cfg.depth // cfg.block_chunks
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        m = _CHUNK_KEY.match(key)
        if m:
            chunk, slot, rest = int(m[1]), int(m[2]), m[3]
            if chunk >= cfg.block_chunks or slot >= per_chunk:
                raise CheckpointError(
                    f"checkpoint key {key!r}: chunk {chunk}, slot {slot} is outside {cfg.block_chunks} chunks of "
                    f"{per_chunk} blocks (depth {cfg.depth})"
                )
            target = f"blocks.{chunk * per_chunk + slot}.{rest}"
        else:
            target = key
        if target in out:
            raise CheckpointError(f"checkpoint holds {target!r} twice: as {origin[target]!r} and {key!r}")
        out[target], origin[target] = value, key
    return out


def read_infinity_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read official Infinity weights: one ``.pth``/``.safetensors`` file (2B), or a folder of safetensors shards
    (8B), listed by ``*.safetensors.index.json`` if present, else every ``*.safetensors`` in it."""
    from ..checkpoint import read_json, read_state_file

    path = Path(path)
    if path.is_file():
        return read_state_file(path)
    if not path.is_dir():
        raise CheckpointError(f"Infinity weights {str(path)!r}: no such file or folder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"Infinity weights folder {str(path)!r} holds several shard indexes: {indexes}")
    if indexes:
        weight_map = read_json(indexes[0], "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(indexes[0])!r} has no weight_map")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"Infinity weights folder {str(path)!r} holds no safetensors shards")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = read_state_file(path / shard)
        clash = sorted(set(part) & set(state))
        if clash:
            raise CheckpointError(f"shard {shard!r} repeats keys already read: {clash[:5]}")
        state.update(part)
    return state


def load_infinity(path: str | Path, cfg: InfinityConfig) -> Infinity:
    """Build :class:`Infinity` for ``cfg`` and load official weights strictly (every key mapped explicitly, every
    parameter and buffer present with its exact shape, nothing left over)."""
    from ..checkpoint import load_strict

    model = Infinity(cfg, init_weights=False)
    load_strict(model, map_infinity_keys(read_infinity_state(path), cfg), what=f"Infinity {cfg}")
    return model.eval()
