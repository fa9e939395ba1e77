"""Fashion-MNIST as the demo model's training data, read from Debian's ``dataset-fashion-mnist`` package.

The package installs the four original idx files (gzip) under ``/usr/share/datasets/fashion-mnist/``. Images are
28x28 uint8 grayscale; the demo model works on ``size`` x ``size`` images in [-1, 1] (bilinear, antialiased
resize of the whole image, so no garment is cropped).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "SCALEKV_FASHION_MNIST"  # overrides DEFAULT_ROOT
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not installed."""


def data_root(root: str | Path | None = None) -> Path:
    """The folder holding the idx files: ``root``, else ``$SCALEKV_FASHION_MNIST``, else the Debian path."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one gzip'd idx file (magic 0x0000080D, D dims as big-endian uint32, then uint8 data)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{str(path)!r}: idx magic {magic:#x}, expected {0x0800 + ndim:#x} (uint8, {ndim} dims)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{str(path)!r}: {data.size} bytes of data, expected {int(np.prod(dims))} for dims {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train": 60,000, "test": 10,000)."""
    if split not in _FILES:
        raise ValueError(f"split {split!r}: expected one of {sorted(_FILES)}")
    folder = data_root(root)
    paths = [folder / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found: missing {missing}. Install the Debian package `dataset-fashion-mnist` "
            f"(apt-get install dataset-fashion-mnist) or point ${ROOT_ENV} at a folder with the four idx .gz files"
        )
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_images(raw: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, size, size)`` in [-1, 1] (antialiased bilinear resize)."""
    x = raw.float().div_(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1).mul_(2).sub_(1)


def load_images(split: str, size: int, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, size, size)`` in [-1, 1] and labels ``(N,)`` of ``split``."""
    raw, labels = load_fashion_mnist(split, root)
    return to_model_images(raw, size), labels
