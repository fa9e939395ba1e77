"""Strict, explicit checkpoint loading shared by every model."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def read_json(path: str | Path, what: str = "config file") -> dict:
    """A JSON object from ``path``; a missing, unreadable or malformed file raises one :class:`CheckpointError`
    naming it (``what`` says what the file is, e.g. "demo model config")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} {str(path)!r} is not a text file: expected JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a JSON {type(data).__name__}: expected an object")
    return data


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message (library messages run on with advice that does not apply)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].rstrip(".")


def load_pickle(path: str | Path):
    """``torch.load`` with ``weights_only=True`` on the CPU; every failure becomes one line naming the file. A file
    that pickles other Python objects is refused as such: scalekv never unpickles arbitrary objects (that can run
    code)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"checkpoint {str(path)!r} pickles the Python object {found.group(1)}, which is not weights-only safe "
                "(loading it could run code): expected a file of tensors only; save the state dict "
                "(torch.save(model.state_dict(), ...)) or a .safetensors file"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: not a readable PyTorch file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: PyTorch cannot read it ({_first_line(e)})"
        ) from None


def read_state_file(path: str | Path, *, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch pickle (``.pth``/``.pt``/``.bin``, weights only).

    ``nested_key`` names the entry of a pickled dict that holds the weights (e.g. ``"vae"``). A missing, truncated or
    corrupt file, or a pickle that is not weights-only safe, raises one :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder: expected a .safetensors or .pth/.pt/.bin file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {_first_line(e)}") from None
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = load_pickle(path)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a .safetensors or .pth/.pt/.bin file")
    if nested_key is not None and isinstance(state, Mapping) and isinstance(state.get(nested_key), Mapping):
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
    from safetensors.torch import save

    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata))
