"""Images as this library hands them around: float ``(N, C, H, W)`` in [0, 1] from the decoders, uint8 for metrics
and files."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float ``(N, C, H, W)`` in [0, 1] -> uint8 ``(N, 3, H, W)`` on the CPU (rounded; one channel is repeated)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, 1 or 3, H, W)")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def to_uint8_hwc(images: torch.Tensor):
    """Float ``(N, C, H, W)`` in [0, 1] -> a uint8 ``(N, H, W, 3)`` numpy array, as PNG writers take it."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


def png_bytes(images: torch.Tensor) -> list[bytes]:
    """Float ``(N, C, H, W)`` in [0, 1] -> one PNG file's bytes per image."""
    import io

    from PIL import Image

    out = []
    for a in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def save_figure(fig, path, dpi: int = 110, tight: bool = False):
    """Write a matplotlib figure as a PNG atomically (rendered in memory, then renamed into place) and close it."""
    import io

    import matplotlib.pyplot as plt

    from .atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def tile_grid(images: torch.Tensor, cols: int, zoom: int = 3, pad: int = 2, left: int = 0, top: int = 0):
    """Float ``(N, C, H, W)`` in [0, 1] as one white PIL canvas, row-major ``cols`` per row, each image upscaled
    ``zoom`` times (nearest) with ``pad`` pixels between tiles and a ``left`` x ``top`` margin for labels."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // cols)
    cell_h, cell_w = h * zoom, w * zoom
    canvas = Image.new("RGB", (left + cols * (cell_w + pad), top + rows * (cell_h + pad)), "white")
    for k, a in enumerate(to_uint8_hwc(images)):
        tile = Image.fromarray(a).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (left + (k % cols) * (cell_w + pad), top + (k // cols) * (cell_h + pad)))
    return canvas
