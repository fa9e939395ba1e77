"""Strict, explicit checkpoint loading shared by every model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def read_state_file(path: str | Path, *, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch pickle (``.pth``/``.pt``/``.bin``, weights only).

    ``nested_key`` names the entry of a pickled dict that holds the weights (e.g. ``"vae"``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a .safetensors or .pth/.pt/.bin file")
    if nested_key is not None and nested_key in state and isinstance(state[nested_key], Mapping):
        state = state[nested_key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a flat state dict of tensors")
    return dict(state)


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Copy ``state`` into ``module``: every parameter and buffer must be present with its exact shape.

    Keys under ``ignore_prefixes`` are accepted and dropped (used for parts the caller chose not to build, such as
    a tokenizer's encoder when only decoding). Anything else unmatched raises one :class:`CheckpointError` that
    lists the missing, unexpected and mis-shaped keys. Values are cast to each target's dtype.
    """
    ignore = tuple(ignore_prefixes)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected, mismatched, matched = [], [], {}
    for key, value in state.items():
        if key in expected:
            if tuple(value.shape) != tuple(expected[key].shape):
                mismatched.append(f"{key} {tuple(value.shape)} != {tuple(expected[key].shape)}")
            else:
                matched[key] = value
        elif not (ignore and key.startswith(ignore)):
            unexpected.append(key)
    if missing or unexpected or mismatched:
        msg = f"checkpoint does not fit {what}:"
        if missing:
            msg += _listing("missing", missing)
        if unexpected:
            msg += _listing("unexpected", unexpected)
        if mismatched:
            msg += _listing("mis-shaped (checkpoint != model)", mismatched)
        raise CheckpointError(msg)
    module.load_state_dict(matched, strict=True)


def save_state_file(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
