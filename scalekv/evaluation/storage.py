"""The run folder: its layout, atomic writes, and the check that a rerun belongs to it.

Layout (``<setup>`` is ``full`` or ``<policy>_b<budget>``, with ``_q<bits>`` appended under quantised storage,
``<j>`` a 6-digit batch number, ``<i>`` an image index)::

    config.json                     the settings that decide images and numbers (compared on every rerun)
    images/<setup>/<i>.png          generated images, uint8 RGB
    records/<setup>/batch_<j>.json  written after the batch's images: time, KV bytes, memory (marks the batch done)
    scores/<metric>/<setup>/batch_<j>.npz  per-image scores of the batch, one folder per metric: fidelity (PSNR,
                                    SSIM), inception (FID features), lpips-alex-<hash of the weights path>, stlpips-alex
    metrics.json, metrics.csv, metrics.md, plots/*.png, grids/*.png

Every file is written to a temporary name in its folder and renamed into place, so an interrupted run leaves no
half-written file behind, and a batch counts as done only once its record exists.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write_bytes, atomic_write_text


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def setup_name(policy: str, budget: float | None, kv_bits: int = 16) -> str:
    """Folder name of one (policy, budget, kv_bits) setting: ``full`` or e.g. ``snapkv_b0.1``, with ``_q<bits>``
    behind it for quantised storage (``full_q4``, ``snapkv_b0.1_q8``)."""
    name = policy if budget is None else f"{policy}_b{budget:g}"
    return name if kv_bits == 16 else f"{name}_q{kv_bits}"


_ABSENT = object()  # a setting one side does not record at all (a run made by an older version)


def _difference(key: str, there: Any, now: Any) -> str:
    """How setting ``key`` differs, short: the entries of a mapping that differ rather than both mappings."""
    if there is _ABSENT or now is _ABSENT:
        return f"{key}: {'not recorded there' if there is _ABSENT else 'not recorded now'}"
    if isinstance(there, dict) and isinstance(now, dict):
        entries = sorted(k for k in set(there) | set(now) if there.get(k, _ABSENT) != now.get(k, _ABSENT))
        return f"{key} differ for {', '.join(map(str, entries))}"
    return f"{key}: {there!r} there, {now!r} now"


class RunFolder:
    """Paths and reads/writes of one evaluation run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def claim(self, identity: dict[str, Any]) -> None:
        """Make the folder this run's: :meth:`check` it, then write ``config.json`` if it is not there yet."""
        if not self.check(identity):
            atomic_write_json(self.config_path, identity)

    def check(self, identity: dict[str, Any], ignore: tuple[str, ...] = ()) -> bool:
        """True if the folder holds a run with ``identity`` (keys in ``ignore`` aside), False if it is new or empty.

        Raises ValueError when the folder holds a different run or files that are not a run's.
        """
        if self.config_path.is_file():
            saved = json.loads(self.config_path.read_text())
            keys = (set(saved) | set(identity)) - set(ignore)
            diff = sorted(k for k in keys if saved.get(k, _ABSENT) != identity.get(k, _ABSENT))
            if diff:
                detail = ", ".join(_difference(k, saved.get(k, _ABSENT), identity.get(k, _ABSENT)) for k in diff)
                raise ValueError(
                    f"--out {str(self.root)!r} holds a run with different settings ({detail}); "
                    "expected the same settings to resume it, or a new folder"
                )
            return True
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise ValueError(
                f"--out {str(self.root)!r} exists and is not an evaluation run (no config.json): "
                "expected a new or empty folder"
            )
        return False

    # -- images --------------------------------------------------------------------------------------------------
    def image_path(self, setup: str, index: int) -> Path:
        return self.root / "images" / setup / f"{index:06d}.png"

    def save_images(self, setup: str, indices: list[int], images: torch.Tensor) -> None:
        """Save ``images`` ``(B, 3, H, W)`` float in [0, 1] as uint8 PNGs named by ``indices``."""
        from ..images import png_bytes

        for index, data in zip(indices, png_bytes(images), strict=True):
            atomic_write_bytes(self.image_path(setup, index), data)

    def load_images(self, setup: str, indices: list[int]) -> torch.Tensor:
        """Read the PNGs of ``indices`` as uint8 ``(B, 3, H, W)``."""
        arrays = []
        for index in indices:
            path = self.image_path(setup, index)
            if not path.is_file():
                raise FileNotFoundError(f"image {str(path)!r} is missing: the run folder was changed by hand")
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    # -- per-batch records and scores ----------------------------------------------------------------------------
    def record_path(self, setup: str, batch: int) -> Path:
        return self.root / "records" / setup / f"batch_{batch:06d}.json"

    def scores_path(self, metric: str, setup: str, batch: int) -> Path:
        return self.root / "scores" / metric / setup / f"batch_{batch:06d}.npz"

    def write_record(self, setup: str, batch: int, record: dict[str, Any]) -> None:
        atomic_write_json(self.record_path(setup, batch), record)

    def read_record(self, setup: str, batch: int) -> dict[str, Any]:
        return json.loads(self.record_path(setup, batch).read_text())

    def write_scores(self, metric: str, setup: str, batch: int, scores: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **scores)
        atomic_write_bytes(self.scores_path(metric, setup, batch), buf.getvalue())

    def read_scores(self, metric: str, setup: str, batch: int) -> dict[str, np.ndarray]:
        with np.load(self.scores_path(metric, setup, batch)) as z:
            return {k: z[k] for k in z.files}
