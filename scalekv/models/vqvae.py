"""VAR's multi-scale residual VQ-VAE (``vae_ch160v4096z32`` and smaller variants), official key names.

Image -> encoder -> quant_conv -> multi-scale residual quantiser -> post_quant_conv -> decoder -> image.
A latent ``f`` of shape ``(B, Cvae, P, P)`` (``P`` = last patch side) is the sum over scales of
``Phi_k(upsample(E[idx_k]))``; :meth:`MultiScaleQuantizer.next_input` is the step the generator takes per scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: channels of a code
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with_encoder: bool = True  # False builds a decode-only model (the encoder keys are then ignored on load)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def __post_init__(self) -> None:
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] < 1:
            raise ValueError(f"patch_nums {self.patch_nums} must be strictly increasing positive sides")
        if self.ch % 32:
            raise ValueError(f"ch={self.ch}: GroupNorm uses 32 groups, so ch must be a multiple of 32")


VQVAE_PRESETS: dict[str, VQVAEConfig] = {
    "vae_ch160v4096z32": VQVAEConfig(),
    "vae_ch160v4096z32_512": VQVAEConfig(patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, one 1x1 conv for q, k and v."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.w_ratio = c**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.bmm(q.transpose(1, 2), k).mul_(self.w_ratio).softmax(dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj_out(out)


class Upsample2x(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level (keys ``down.i.block.j`` / ``up.i.attn.j``): its residual blocks, each followed by its
    attention block where the level has them. The resampling layer, if any, is the caller's step."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int, attn: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c) if attn else nn.Identity()
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            cout = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if i == n - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(cin))
            if i != n - 1:
                level.downsample = Downsample2x(cin)
            self.down.append(level)
        self.mid = _Mid(cin, cfg.using_mid_sa)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = _Mid(cin, cfg.using_mid_sa)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            level = _Level()
            cout = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout))
                cin = cout
                if i == n - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample2x(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement of an upsampled code map: ``(1 - r) * h + r * conv3x3(h)``."""

    def __init__(self, c: int, ratio: float) -> None:
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class _PhiShared(nn.Module):
    def __init__(self, phis: list[Phi]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


def phi_indices(num_scales: int, num_phi: int) -> list[int]:
    """Which Phi each scale uses: the nearest of ``num_phi`` evenly spaced ticks to ``k / (n - 1)``.

    Computed in float64 numpy exactly as the official code does; at the 10-scale schedules this gives
    [0,0,1,1,1,2,2,3,3,3] (scale 2 is a tie in exact arithmetic that float rounding resolves to 1).
    """
    ticks = (
        np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
        if num_phi == 4
        else np.linspace(1 / (2 * num_phi), 1 - 1 / (2 * num_phi), num_phi)
    )
    denom = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - k / denom))) for k in range(num_scales)]


class MultiScaleQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: residual quantisation over the scales of ``patch_nums``."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.patch_nums = tuple(cfg.patch_nums)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = _PhiShared([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi)])
        # training statistic of the official checkpoints (codebook hits per scale); never read at inference
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.phi_index = phi_indices(len(cfg.patch_nums), cfg.share_quant_resi)

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.qresi_ls[self.phi_index[si]](h)

    def codes_to_contribution(self, si: int, idx: torch.Tensor) -> torch.Tensor:
        """What scale ``si``'s tokens ``idx`` ``(B, pn*pn)`` add to the latent: ``(B, Cvae, P, P)``."""
        pn, full = self.patch_nums[si], self.patch_nums[-1]
        h = self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.phi(si, h)

    def next_input(self, si: int, f_hat: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``si``'s tokens to ``f_hat`` (in place) and return ``(f_hat, next)``, where ``next`` is the
        transformer input of scale ``si + 1`` as ``(B, pn_next**2, Cvae)``, or None after the last scale."""
        f_hat.add_(self.codes_to_contribution(si, idx))
        if si == len(self.patch_nums) - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        nxt = F.interpolate(f_hat, size=(pn, pn), mode="area")
        return f_hat, nxt.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual quantisation of a latent ``(B, Cvae, P, P)``: token ids per scale ``(B, pn*pn)``
        and the reconstructed latent ``f_hat``."""
        n = len(self.patch_nums)
        f_rest, f_hat, out = f.detach().clone(), torch.zeros_like(f), []
        w = self.embedding.weight
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != n - 1 else f_rest
            z = z.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            dist = z.square().sum(dim=1, keepdim=True) + w.square().sum(dim=1)
            dist.addmm_(z, w.T, alpha=-2, beta=1)
            idx = dist.argmin(dim=1).view(f.shape[0], pn * pn)
            h = self.codes_to_contribution(si, idx)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(idx)
        return out, f_hat

    def teacher_inputs(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """The transformer inputs of scales 1..n-1 for ground-truth tokens: ``(B, L - first, Cvae)``."""
        b, full = idx[0].shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(b, self.embedding.embedding_dim, full, full)
        inputs = []
        for si in range(len(self.patch_nums) - 1):
            f_hat, nxt = self.next_input(si, f_hat, idx[si])
            inputs.append(nxt)
        return torch.cat(inputs, dim=1)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.with_encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.decoder = Decoder(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.quantize = MultiScaleQuantizer(cfg)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] ``(B, C, H, W)`` -> latent ``(B, Cvae, H/16, W/16)`` before quantisation."""
        if not self.cfg.with_encoder:
            raise RuntimeError("this VQVAE was built decode-only (with_encoder=False); it cannot encode")
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.quantize(self.encode(img))[0]

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, Cvae, P, P)`` -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def idx_to_img(self, idx: list[torch.Tensor]) -> torch.Tensor:
        b, full = idx[0].shape[0], self.cfg.patch_nums[-1]
        f_hat = self.quantize.embedding.weight.new_zeros(b, self.cfg.z_channels, full, full)
        for si, ids in enumerate(idx):
            f_hat.add_(self.quantize.codes_to_contribution(si, ids))
        return self.decode(f_hat)


def load_vqvae(path: str, cfg: VQVAEConfig) -> VQVAE:
    """Build a :class:`VQVAE` for ``cfg`` and load ``path`` strictly. With ``cfg.with_encoder=False`` the
    checkpoint's ``encoder.*``/``quant_conv.*`` keys (if any) are ignored on purpose; everything else must fit."""
    from ..checkpoint import load_strict, read_state_file

    model = VQVAE(cfg)
    ignore = () if cfg.with_encoder else ("encoder.", "quant_conv.")
    state = read_state_file(path)
    adopt_training_statistic(model, state)
    load_strict(model, state, what=f"VQVAE {cfg}", ignore_prefixes=ignore)
    return model.eval()


HIT_STATISTIC = "quantize.ema_vocab_hit_SV"


def adopt_training_statistic(model: VQVAE, state: dict[str, torch.Tensor]) -> None:
    """Let ``model`` take the checkpoint's codebook-hit statistic whatever schedule it runs.

    The official file holds one row per scale of its 10-scale training schedule; a VQVAE built for another schedule
    has another number of rows. As the reference does, the buffer is replaced by the checkpoint's (inference never
    reads it); its vocabulary side must still match, and every other key stays strict."""
    value = state.get(HIT_STATISTIC)
    buffer = model.quantize.ema_vocab_hit_SV
    if value is None or value.dim() != 2 or value.shape[1] != buffer.shape[1] or value.shape == buffer.shape:
        return  # absent, or a shape load_strict reports (wrong vocabulary), or already fitting
    model.quantize.ema_vocab_hit_SV = torch.zeros(value.shape, dtype=buffer.dtype, device=buffer.device)
