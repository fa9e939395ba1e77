"""Checks of values every entry point takes: seeds and devices (errors name the value and what was expected)."""

from __future__ import annotations

import numbers
from typing import Any

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what every torch generator takes, on every device


def _label(name: str, value: Any) -> str:
    """``--seed -1`` for a command-line flag, ``seed=-1`` for a Python argument."""
    return f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"


def check_seed(seed: Any, name: str = "seed", *, count: int = 1) -> int:
    """``seed`` as an int in [0, 2**63). ``count`` seeds ``seed, seed + 1, ...`` are used (one per batch), so the
    last of them must be in range too. Floats are refused, never truncated (``1.5`` is not seed 1)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{_label(name, seed)}: expected an integer seed in [0, 2**63)")
    seed = int(seed)
    if seed < 0 or seed + max(count, 1) - 1 >= SEED_LIMIT:
        extra = f", and so must seed + {count - 1}, the last seed used" if count > 1 else ""
        raise ValueError(f"{_label(name, seed)}: expected an integer seed in [0, 2**63){extra}")
    return seed


SEEDINGS = ("image", "batch")  # per-image generators (the default) or the reference's one generator per batch


def check_seeding(seeding: Any, name: str = "seeding") -> str:
    """``seeding`` as one of :data:`SEEDINGS`: ``"image"`` gives image ``i`` its own generator, ``"batch"`` one
    generator drives the whole batch (the official implementations', whose images depend on their batch)."""
    if not isinstance(seeding, str) or seeding not in SEEDINGS:
        raise ValueError(f"{_label(name, seeding)}: expected one of {list(SEEDINGS)}")
    return seeding


def check_seeds(seed: Any, batch: int, name: str = "seed", *, seeding: str = "image") -> list[int]:
    """The seeds of a batch of ``batch`` images. Under ``seeding="image"``: an integer ``s`` (None means 0) gives
    image ``i`` seed ``s + i``, and a list or tuple gives one seed per image (its length must equal ``batch``).
    Under ``seeding="batch"``: one integer, the seed of the batch's generator, returned as a one-element list.
    Every seed is an integer in [0, 2**63)."""
    seeding = check_seeding(seeding)
    seed = 0 if seed is None else seed
    if isinstance(seed, (list, tuple)):
        if seeding == "batch":
            raise ValueError(
                f"{_label(name, seed)}: seeding='batch' takes one integer seed for the whole batch, not a list"
            )
        if len(seed) != batch:
            raise ValueError(f"{_label(name, seed)}: {len(seed)} seeds for a batch of {batch}; expected one per image")
        return [check_seed(s, f"{name}[{i}]") for i, s in enumerate(seed)]
    if seeding == "batch":
        return [check_seed(seed, name)]
    first = check_seed(seed, name, count=batch)
    return [first + i for i in range(batch)]


def check_device(device: Any, name: str = "device"):
    """The ``torch.device`` that ``device`` names, if this torch can use it; ValueError otherwise.

    Refuses what torch cannot parse (``"foo"``), a CUDA device on a build without CUDA or a machine without a GPU,
    a GPU index beyond the ones present, and any other accelerator type this torch does not provide."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{_label(name, device)}: expected a torch device such as 'cpu', 'cuda' or 'cuda:0'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
            raise ValueError(f"{_label(name, device)}: this torch ({torch.__version__}) {why}; expected 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"{_label(name, device)}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
        return dev
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, dev.type, None)
        available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        others = "'cpu' or 'cuda'" if torch.cuda.is_available() else "'cpu'"
        raise ValueError(f"{_label(name, device)}: this torch cannot run on {dev.type!r} devices; expected {others}")
    return dev
