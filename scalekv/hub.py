"""Models by name: the official VAR presets (weights from a local folder) and the shipped demo model."""

from __future__ import annotations

from .models.var import VAR_PRESETS
from .pipeline import VARPipeline


def model_names() -> list[str]:
    return sorted(VAR_PRESETS)


def load_pipeline(name: str, weights: str | None = None, **files) -> VARPipeline:
    """Load the model called ``name``. ``weights`` is the folder holding its checkpoint files."""
    if name in VAR_PRESETS:
        return VARPipeline.from_pretrained(name, weights, **files)
    raise ValueError(f"unknown model {name!r}: expected one of {model_names()}")
