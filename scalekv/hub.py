"""Models by name: the official VAR presets (weights from a local folder) and the shipped demo model."""

from __future__ import annotations

from pathlib import Path

from .infinity_pipeline import InfinityPipeline, infinity_names
from .models.var import VAR_PRESETS
from .pipeline import VARPipeline

DEMO = "demo"
DEMO_DIR = Path(__file__).parent / "weights" / "demo"  # var.safetensors, vae.safetensors, config.json


def default_plan(model: str, budget: float | None, weights: str | Path | None = None, schedule=None) -> Path | None:
    """The ScaleKV plan shipped for ``model`` at ``budget`` (None: 10%), or None where there is none.

    * ``demo``: the calibrated plans in the model's folder (``plans/scalekv_{4,10,20}pct.json``; the shipped copy, or
      those next to ``weights``), made by ``scalekv calibrate`` (docs/calibration.md);
    * ``infinity-2b`` / ``infinity-8b``: the released 10% budget files, on the 1024x1024 schedule only.
    """
    from .cache.plan import PLANS_DIR

    budget = 0.1 if budget is None else budget
    percent = round(budget * 100)
    if abs(budget * 100 - percent) > 1e-9:
        return None
    if model == DEMO:
        path = (Path(weights) if weights else DEMO_DIR) / "plans" / f"scalekv_{percent}pct.json"
    elif model in ("infinity-2b", "infinity-8b") and percent == 10:
        from .schedules import get_schedule

        if schedule is not None and schedule != get_schedule(1.0, "1M"):
            return None
        path = PLANS_DIR / f"{model.replace('-', '_')}_10pct.json"
    else:
        return None
    return path if path.is_file() else None


HEAD_AWARE = ("hack", "heatkv", "ams_kv")  # the policies that read per-head statistics (``calibration``)


def default_head_stats(model: str, weights: str | Path | None = None) -> Path | None:
    """The per-head statistics shipped for ``model`` (the demo: ``plans/head_stats.json``, made by ``scalekv
    calibrate --method hack``), or None."""
    if model != DEMO:
        return None
    path = (Path(weights) if weights else DEMO_DIR) / "plans" / "head_stats.json"
    return path if path.is_file() else None


def policy_defaults(model: str, policy: str, budget: float | None, weights=None, schedule=None) -> dict:
    """Arguments ``policy`` takes by default on ``model`` beyond its budget: ScaleKV's shipped plan, the head-aware
    policies' shipped statistics, if any."""
    if policy in HEAD_AWARE:
        path = default_head_stats(model, weights)
        return {"calibration": str(path)} if path is not None else {}
    if policy != "scalekv":
        return {}
    path = default_plan(model, budget, weights, schedule)
    return {"plan": str(path)} if path is not None else {}


# the arguments that make a policy's plan or calibration: given one, the shipped default is not added
PLAN_SOURCES = frozenset({"plan", "drafters", "calibration", "contextual", "demanding", "seed"})


def with_policy_defaults(
    given: dict | None, model: str, policy: str, budget: float | None, weights=None, schedule=None
) -> dict:
    """``given`` arguments of ``policy`` plus the :func:`policy_defaults` they leave out: ScaleKV keeps the plan the
    model ships for ``budget`` unless ``given`` names its own plan (``plan`` or ``drafters``)."""
    given = dict(given or {})
    if budget is None or PLAN_SOURCES & set(given):
        return given
    return {**policy_defaults(model, policy, budget, weights, schedule), **given}


VAR_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # the official VAR demo settings
# the official Infinity settings (tau: the logit temperature) and image size (WIDTHxHEIGHT)
INFINITY_SAMPLING = {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}
INFINITY_SIZE = "1024x1024"

LABELS, PROMPTS = "labels", "prompts"  # what a model generates from: class labels or text prompts


def input_kind(model: str) -> str:
    """``"prompts"`` for the text-to-image models (Infinity), ``"labels"`` for the class-conditional ones (VAR, the
    demo model, and any other name, e.g. a pipeline handed to the evaluation directly)."""
    return PROMPTS if model in infinity_names() else LABELS


def default_sampling(model: str, weights: str | Path | None = None) -> dict:
    """Sampling settings of a model: Infinity's official ones (cfg 3, tau 0.5, top-k 900, top-p 0.97); the demo
    model's own (stored in its config.json by ``scalekv train export``); else the official VAR ones (cfg 1.5, top-k
    900, top-p 0.96)."""
    if input_kind(model) == PROMPTS:
        return dict(INFINITY_SAMPLING)
    if model != DEMO:
        return dict(VAR_SAMPLING)
    path = (Path(weights) if weights else DEMO_DIR) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"demo model config {str(path)!r} does not exist (expected `scalekv train export`)")
    from .checkpoint import read_json

    sampling = read_json(path, "demo model config").get("sampling")
    if not isinstance(sampling, dict) or sorted(sampling) != ["cfg", "top_k", "top_p"]:
        raise ValueError(
            f"demo model config {str(path)!r}: 'sampling' is {sampling!r}, expected an object with cfg, top_k and "
            "top_p; re-export the model with `scalekv train export`"
        )
    return dict(sampling)


def model_names() -> list[str]:
    return sorted([*VAR_PRESETS, DEMO, *infinity_names()])


def load_demo(folder: str | Path | None = None) -> VARPipeline:
    """The demo model shipped in the package (a small VAR trained on Fashion-MNIST, see docs/model_card.md), or
    the same layout in ``folder`` (what ``scalekv train export`` writes). Runs on CPU in float32."""
    from .checkpoint import CheckpointError, read_json
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
    meta = read_json(paths[0], "demo model config")
    try:
        if not isinstance(meta.get("var"), dict) or not isinstance(meta.get("vae"), dict):
            raise ValueError("expected 'var' and 'vae' objects (the model's architecture)")
        var_cfg = config_from_json(VARConfig, meta["var"])
        vae_cfg = config_from_json(VQVAEConfig, meta["vae"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"demo model config {str(paths[0])!r}: {e}") from None
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
