"""Models by name: the official VAR presets (weights from a local folder) and the shipped demo model."""

from __future__ import annotations

import json
from pathlib import Path

from .infinity_pipeline import InfinityPipeline, infinity_names
from .models.var import VAR_PRESETS
from .pipeline import VARPipeline

DEMO = "demo"
DEMO_DIR = Path(__file__).parent / "weights" / "demo"  # var.safetensors, vae.safetensors, config.json


def model_names() -> list[str]:
    return sorted([*VAR_PRESETS, DEMO, *infinity_names()])


def load_demo(folder: str | Path | None = None) -> VARPipeline:
    """The demo model shipped in the package (a small VAR trained on Fashion-MNIST, see docs/model_card.md), or
    the same layout in ``folder`` (what ``scalekv train export`` writes). Runs on CPU in float32."""
    from .checkpoint import CheckpointError
    from .models.var import VARConfig, load_var
    from .models.vqvae import VQVAEConfig, load_vqvae
    from .training.common import config_from_json

    folder = Path(folder) if folder is not None else DEMO_DIR
    paths = [folder / n for n in ("config.json", "var.safetensors", "vae.safetensors")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"demo model incomplete: missing {missing} (expected the output of `scalekv train export`)"
        )
    meta = json.loads(paths[0].read_text())
    var_cfg = config_from_json(VARConfig, meta["var"])
    vae_cfg = config_from_json(VQVAEConfig, meta["vae"])
    return VARPipeline(load_var(str(paths[1]), var_cfg), load_vqvae(str(paths[2]), vae_cfg))


def load_pipeline(name: str, weights: str | None = None, **files) -> VARPipeline | InfinityPipeline:
    """Load the model called ``name``. ``weights`` is the folder holding its checkpoint files (for ``"demo"``
    it is optional and defaults to the copy shipped inside the package)."""
    if name in VAR_PRESETS:
        return VARPipeline.from_pretrained(name, weights, **files)
    if name == DEMO:
        if files:
            raise ValueError(f"model 'demo' takes a weights folder only, not {sorted(files)}")
        return load_demo(weights)
    if name in infinity_names():  # files: vae=FILE (required), t5=FOLDER (optional)
        return InfinityPipeline.from_pretrained(name, weights, **files)
    raise ValueError(f"unknown model {name!r}: expected one of {model_names()}")
