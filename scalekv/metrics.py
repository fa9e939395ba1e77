"""Image fidelity metrics between a compressed-cache image and its full-cache reference.

Both take float images ``(B, C, H, W)`` in [0, 1] and return one value per image ``(B,)`` float32.
"""

from __future__ import annotations

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
