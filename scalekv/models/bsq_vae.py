"""Infinity's BSQ-VAE (``infinity_vae_d32reg`` and ``infinity_vae_d56_f8_14_patchify``), official key names.

Image -> encoder -> multi-scale binary spherical quantiser (BSQ) -> decoder -> image. A code is ``d`` bits per
latent position, each bit mapped to ``+-1/sqrt(d)``. The latent the decoder sees, ``(B, d, H, W)``, is the sum over
scales of the trilinearly upsampled codes of every scale. There is no attention, no quant/post-quant convolution and
no projection (``dim == codebook_dim``).

Key spelling: the reference wraps every convolution and every GroupNorm (``decoder.conv_in.conv.weight``,
``...norm1.norm.weight``), which is the naming of this module; :func:`map_vae_keys` also accepts the plain form
(``decoder.conv_in.weight``) and the duplicate ``quantize.lfq.mask`` entry, and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError


@dataclass(frozen=True)
class BSQVAEConfig:
    codebook_dim: int = 32  # d: bits per latent position (= z channels)
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder has one more per level
    patch_size: int = 16  # pixels per latent position = 2 ** (len(ch_mult) - 1)
    in_channels: int = 3
    groups: int = 32
    eps: float = 1e-6
    with_encoder: bool = True  # False builds a decode-only model (encoder keys are then ignored on load)

    def __post_init__(self) -> None:
        if self.patch_size != 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"patch_size={self.patch_size} with ch_mult={self.ch_mult}: expected 2 ** (levels - 1) = "
                f"{2 ** (len(self.ch_mult) - 1)}"
            )
        for m in self.ch_mult:
            if (self.base_ch * m) % self.groups:
                raise ValueError(f"width {self.base_ch * m} is not divisible by {self.groups} GroupNorm groups")


BSQ_VAE_PRESETS: dict[str, BSQVAEConfig] = {
    "infinity_vae_d32reg": BSQVAEConfig(),
    "infinity_vae_d56_f8_14_patchify": BSQVAEConfig(codebook_dim=14, ch_mult=(1, 2, 4, 4), patch_size=8),
}


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """A 2-D convolution under the reference's wrapper name (``<name>.conv.weight``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm under the reference's wrapper name (``<name>.norm.weight``)."""

    def __init__(self, c: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: BSQVAEConfig) -> None:
        super().__init__()
        self.norm1 = Norm(cin, cfg.groups, cfg.eps)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout, cfg.groups, cfg.eps)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = Conv(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = Conv(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and optionally ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[ResnetBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, c: int, cfg: BSQVAEConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, cfg)
        self.block_2 = ResnetBlock(c, c, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """(B, 3, P*H, P*W) image in [-1, 1] -> (B, d, H, W) latent."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.in_channels, cfg.base_ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.base_ch
        for i, cout in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, cfg))
                cin = cout
            level = _Level(blocks)
            if i < len(widths) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cin, cfg)
        self.norm_out = Norm(cin, cfg.groups, cfg.eps)
        self.conv_out = Conv(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, d, H, W) latent -> (B, 3, P*H, P*W) image (unclamped)."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = Conv(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = _Mid(cin, cfg)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, widths[i], cfg))
                cin = widths[i]
            level = _Level(blocks)
            if i > 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is level i; it runs from the coarsest level down to 0
        self.norm_out = Norm(cin, cfg.groups, cfg.eps)
        self.conv_out = Conv(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class BitQuantizer(nn.Module):
    """Binary spherical quantisation of ``d`` channels; holds the official ``mask`` buffer (bit weights)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64))

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits ``(B, H, W, d)`` (0/1, any integer or float dtype) -> codes ``(B, d, H, W)`` of ``+-1/sqrt(d)``.

        Like the reference, the codes are L2-normalised over the ``d`` channels afterwards: a mathematical no-op that
        moves the float32 value by one ulp (0.1767767071723938 instead of float32(1/sqrt(32))).
        """
        if bits.shape[-1] != self.d:
            raise ValueError(f"bits have {bits.shape[-1]} channels in the last dim; expected {self.d}")
        codes = bits.float() * (2 / math.sqrt(self.d)) - 1 / math.sqrt(self.d)
        return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One scale: ``z`` (B, d, h, w) -> (bits (B, h, w, d) uint8, codes (B, d, h, w)).

        Each position is L2-normalised over its ``d`` channels and bit = (value > 0).
        """
        bits = (F.normalize(z, dim=1) > 0).permute(0, 2, 3, 1).to(torch.uint8)
        return bits, self.bits_to_codes(bits)


def upsample_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Trilinear (align_corners=False) resize of ``(B, d, h, w)`` to ``size`` through a unit time axis, as the
    reference does; 2-D bilinear would differ by up to 5e-7."""
    return F.interpolate(codes.unsqueeze(2), size=(1, *size), mode="trilinear").squeeze(2)


class BSQVAE(nn.Module):
    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.with_encoder:
            self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = nn.Module()
        self.quantizer.lfq = BitQuantizer(cfg.codebook_dim)

    @property
    def lfq(self) -> BitQuantizer:
        return self.quantizer.lfq

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, P*H, P*W) in [-1, 1] -> latent (B, d, H, W) (before quantisation)."""
        if not self.cfg.with_encoder:
            raise RuntimeError("this BSQ-VAE was built decode-only (with_encoder=False)")
        return self.encoder(img)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, d, H, W) -> image (B, 3, P*H, P*W) clamped to [-1, 1], RGB."""
        return self.decoder(z).clamp_(-1, 1)

    def quantize_multiscale(
        self, z: torch.Tensor, sizes: tuple[tuple[int, int], ...] | list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual BSQ of a latent ``z`` (B, d, H, W) over map ``sizes`` (VAE grid, last = (H, W)).

        At each scale the residual is area-downsampled to ``(h, w)``, quantised to bits, and its code is
        trilinearly upsampled and subtracted. Returns the bits per scale ``(B, h, w, d)`` uint8 and the
        reconstruction (the sum of the upsampled codes), ``(B, d, H, W)``.
        """
        full = tuple(z.shape[-2:])
        if tuple(sizes[-1]) != full:
            raise ValueError(f"the last scale {tuple(sizes[-1])} must equal the latent size {full}")
        residual, recon, bits = z.float(), torch.zeros_like(z, dtype=torch.float32), []
        for h, w in sizes:
            part = F.adaptive_avg_pool2d(residual, (h, w)) if (h, w) != full else residual
            b, codes = self.lfq.quantize(part)
            up = upsample_codes(codes, full) if (h, w) != full else codes
            residual = residual - up
            recon = recon + up
            bits.append(b)
        return bits, recon


def map_vae_keys(state: Mapping[str, torch.Tensor], model: BSQVAE) -> dict[str, torch.Tensor]:
    """Rename an official VAE state dict onto :class:`BSQVAE`'s keys.

    Accepted spellings, and nothing else: the model's own (wrapped) names, the plain names without the ``.conv`` /
    ``.norm`` wrapper level, and ``quantize.lfq.mask`` (the reference registers the quantiser twice; the copy must
    equal ``quantizer.lfq.mask``). Unknown keys are passed through unchanged so the strict load reports them.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    duplicate_mask = None
    for key, value in state.items():
        if key == "quantize.lfq.mask":
            duplicate_mask = value
            continue
        target = key
        if key not in own:
            stem, _, leaf = key.rpartition(".")
            for wrapper in ("conv", "norm"):
                if f"{stem}.{wrapper}.{leaf}" in own:
                    target = f"{stem}.{wrapper}.{leaf}"
        if target in out:
            raise CheckpointError(f"VAE checkpoint holds {target!r} twice: as {origin[target]!r} and {key!r}")
        out[target], origin[target] = value, key
    if duplicate_mask is not None:
        main = out.get("quantizer.lfq.mask")
        if main is None:
            out["quantizer.lfq.mask"] = duplicate_mask
        elif not (main.is_meta or duplicate_mask.is_meta) and not torch.equal(main, duplicate_mask):
            raise CheckpointError("VAE checkpoint: quantize.lfq.mask differs from quantizer.lfq.mask")
    return out


def load_bsq_vae(path: str, cfg: BSQVAEConfig) -> BSQVAE:
    """Build :class:`BSQVAE` for ``cfg`` and load an official VAE file strictly.

    ``path`` is a ``.pth`` whose weights sit under ``"vae"`` (as released) or a flat ``.pth``/``.safetensors``
    state dict, in either key spelling. With ``cfg.with_encoder=False`` the ``encoder.*`` keys are accepted and dropped.
    """
    from ..checkpoint import load_strict, read_state_file

    model = BSQVAE(cfg)
    state = map_vae_keys(read_state_file(path, nested_key="vae"), model)
    load_strict(model, state, what=f"BSQ-VAE {cfg}", ignore_prefixes=() if cfg.with_encoder else ("encoder.",))
    return model.eval()
