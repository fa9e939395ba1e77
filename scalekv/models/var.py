"""VAR: the class-conditional next-scale transformer, with the official checkpoints' key names.

Token layout: scale-major, row-major inside a scale; scale ``k`` occupies ``[begin_k, begin_k + pn_k**2)``.
Self-attention hands its real (normalised, scaled) queries, keys and values to a :class:`~scalekv.cache.KVCache`
and attends over what the cache returns; the model knows nothing about compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.base import CacheLayout, KVCache, compute_dtype
from ..schedules import Scale, make_scales
from .layers import FFN, QKVAttention


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024  # C (= D, the condition width)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class_emb has num_classes + 1 rows; the last is the null (unconditional) class
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] != 1:
            raise ValueError(f"patch_nums {self.patch_nums}: expected strictly increasing sides starting at 1")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def scales(self) -> tuple[Scale, ...]:
        return make_scales([(p, p) for p in self.patch_nums])

    @classmethod
    def official(cls, depth: int, **overrides) -> VARConfig:
        """The released models tie width and heads to depth: C = 64 * depth, heads = depth."""
        return replace(cls(depth=depth, embed_dim=64 * depth, num_heads=depth), **overrides)


PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

VAR_PRESETS: dict[str, VARConfig] = {
    "var-d16": VARConfig.official(16),
    "var-d20": VARConfig.official(20),
    "var-d24": VARConfig.official(24),
    "var-d30": VARConfig.official(30),
    "var-d36": VARConfig.official(36, shared_aln=True, patch_nums=PN_512),
}


class SelfAttention(QKVAttention):
    def __init__(self, cfg: VARConfig, layer: int) -> None:
        super().__init__(cfg.embed_dim, cfg.num_heads, cfg.head_dim, layer)
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        scale: Scale | None = None,
    ) -> torch.Tensor:
        q, k, v = self.qkv(x)  # each (B, H, n, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        return self.attend(q, k, v, self.scale, mask, cache, scale)


class AdaLNBlock(nn.Module):
    """``x += g1 * Attn(LN(x)(1+s1)+b1); x += g2 * FFN(LN(x)(1+s2)+b2)`` with (g1,g2,s1,s2,b1,b2) from the condition."""

    def __init__(self, cfg: VARConfig, layer: int) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.attn = SelfAttention(cfg, layer)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """``cond``: (B, C) class condition, or (B, 1, 6, C) shared-AdaLN output when ``shared_aln``."""
        if self.shared_aln:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(b1), **attn_kwargs).mul_(g1)
        return x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(b2)).mul(g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(cond.shape[0], 1, 6, -1)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, L = cfg.embed_dim, cfg.seq_len
        self.word_embed = nn.Linear(cfg.z_channels, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, c))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        nn.init.trunc_normal_(self.pos_start, std=(1 / c / 3) ** 0.5)
        nn.init.trunc_normal_(self.pos_1LC, std=(1 / c / 3) ** 0.5)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c))
        self.blocks = nn.ModuleList(AdaLNBlock(cfg, i) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)
        # buffers of the official checkpoints: level of every token and the block-causal training mask
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, L)
        self.register_buffer("lvl_1L", lvl)
        allowed = lvl.view(L, 1) >= lvl.view(1, L)
        mask = torch.zeros(L, L).masked_fill_(~allowed, float("-inf"))
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, L, L))

    # -- pieces shared by teacher forcing and generation -------------------------------------------------------
    def level_pos(self) -> torch.Tensor:
        """``lvl_embed(level) + pos`` for every token: (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def block_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.shared_ada_lin(cond) if self.cfg.shared_aln else cond

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32) for hidden states ``h`` (B, n, C) under the raw class condition (B, C)."""
        dtype = self.head.weight.dtype  # float32 models compute the head in float32, as the official code does
        return self.head(self.head_nm(h.to(dtype), cond.to(dtype))).float()

    def first_tokens(self, cond: torch.Tensor, lvl_pos: torch.Tensor) -> torch.Tensor:
        return cond.unsqueeze(1) + self.pos_start.expand(cond.shape[0], 1, -1) + lvl_pos[:, :1]

    # -- teacher forcing ---------------------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
        """Uncached teacher-forced logits (B, L, V) for ``labels`` (B,) and next-scale inputs ``x_BLCv``
        (B, L - 1, Cvae), under the block-causal mask. No condition dropout (apply it to labels when training)."""
        cond = self.class_emb(labels)
        n = x_BLCv.shape[1] + 1
        sos = cond.unsqueeze(1) + self.pos_start.expand(cond.shape[0], 1, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv.float())), dim=1)
        x = x + (self.lvl_embed(self.lvl_1L[:, :n]) + self.pos_1LC[:, :n])
        block_cond = self.block_condition(cond)
        mask = self.attn_bias_for_masking[:, :, :n, :n].to(x.dtype)
        for block in self.blocks:
            x = block(x, block_cond, mask=mask)
        return self.logits(x, cond)

    # -- cached inference, one scale at a time -----------------------------------------------------------------
    def cache_layout(self, rows: int, cond_rows: int) -> CacheLayout:
        cfg = self.cfg
        scale = self.blocks[0].attn.scale
        p = self.pos_start
        return CacheLayout(
            cfg.depth, cfg.num_heads, cfg.head_dim, cfg.scales, rows, cond_rows, scale, compute_dtype(p), p.device
        )

    def step(self, x: torch.Tensor, cond: torch.Tensor, block_cond: torch.Tensor, cache: KVCache, scale: Scale):
        """Run every block on the tokens ``x`` (rows, h*w, C) of ``scale`` against ``cache``; return logits."""
        for block in self.blocks:
            x = block(x, block_cond, cache=cache, scale=scale)
        return self.logits(x, cond)


def load_var(path: str, cfg: VARConfig) -> VAR:
    """Build :class:`VAR` for ``cfg`` and load an official ``var_d*.pth`` (or a safetensors file) strictly."""
    from ..checkpoint import load_strict, read_state_file

    model = VAR(cfg)
    load_strict(model, read_state_file(path), what=f"VAR {cfg}")
    return model.eval()
