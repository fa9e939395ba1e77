"""Models by name: one registry entry per model holds everything the library knows about it.

An entry (:class:`ModelEntry`) gives the model's family and architecture preset, the checkpoint and tokenizer files
it is loaded from, what it generates from (class labels or prompts), its sampling defaults, its default image size
and the plans shipped for it. Every command and helper below dispatches on the entry, never on the model's name.
The names: the official VAR presets (``var-d16`` ... ``var-d36``) and Infinity models (``infinity-2b``,
``infinity-8b``, and ``infinity`` for an architecture read from the weights folder), with weights from a local
folder, and ``demo``, the small VAR shipped inside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .infinity_pipeline import OFFICIAL_FILES, InfinityPipeline
from .models.infinity import INFINITY_PRESETS
from .models.var import VAR_PRESETS
from .pipeline import VARPipeline

DEMO = "demo"
DEMO_DIR = Path(__file__).parent / "weights" / "demo"  # var.safetensors, vae.safetensors, config.json

VAR_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # the official VAR demo settings
# the official Infinity settings (tau: the logit temperature) and image size (WIDTHxHEIGHT)
INFINITY_SAMPLING = {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}
INFINITY_SIZE = "1024x1024"

LABELS, PROMPTS = "labels", "prompts"  # what a model generates from: class labels or text prompts


@dataclass(frozen=True)
class ModelEntry:
    """What the library knows about one model.

    ``preset``: the architecture (a ``VARConfig`` / ``InfinityConfig``), or None where it is read from the model's
    folder (``demo``: its ``config.json``; ``infinity``: ``config.json`` beside the weights). ``weight_files`` /
    ``tokenizer_files``: the file names looked for in the weights folder (the tokenizer: the VQVAE or BSQ-VAE).
    ``sampling``: the sampling defaults, or None where the model's folder holds them (``demo``). ``plans``:
    ``(budget percent, file)`` of the shipped ScaleKV plans, the file relative to the model's folder (``folder``
    True: ``demo``) or to the package's ``plans/``; ``plan_size``: the only image size those plans are for.
    """

    name: str
    family: str  # "var" or "infinity"
    input_kind: str  # LABELS or PROMPTS
    load: Callable[..., Any]  # (weights, **files) -> pipeline
    preset: Any = None
    weight_files: tuple[str, ...] = ()
    tokenizer_files: tuple[str, ...] = ()
    sampling: dict[str, float] | None = None
    size: str | None = None  # the default image size (WIDTHxHEIGHT), text-to-image models
    plans: tuple[tuple[int, str], ...] = ()
    plans_in_folder: bool = False
    plan_size: str | None = None
    head_stats: str | None = None  # the head-aware policies' shipped statistics, relative to the model's folder
    class_names: tuple[str, ...] | None = None  # human names of the labels, where the model has them
    folder: Path | None = field(default=None, compare=False)  # the shipped copy (demo)

    def sampling_for(self, weights: str | Path | None = None) -> dict:
        """The sampling defaults (for ``demo``: those ``scalekv train export`` stored in its ``config.json``)."""
        if self.sampling is not None:
            return dict(self.sampling)
        path = (Path(weights) if weights else self.folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.name} model config {str(path)!r} does not exist (expected `scalekv train export`)"
            )
        from .checkpoint import read_json

        sampling = read_json(path, f"{self.name} model config").get("sampling")
        if not isinstance(sampling, dict) or sorted(sampling) != ["cfg", "top_k", "top_p"]:
            raise ValueError(
                f"{self.name} model config {str(path)!r}: 'sampling' is {sampling!r}, expected an object with cfg, "
                "top_k and top_p; re-export the model with `scalekv train export`"
            )
        return dict(sampling)

    def head_stats_path(self, weights: str | Path | None = None) -> Path | None:
        """The shipped per-head statistics (HACK, HeatKV, AMS-KV read them), or None."""
        if self.head_stats is None:
            return None
        path = (Path(weights) if weights else self.folder) / self.head_stats
        return path if path.is_file() else None

    def plan_path(self, budget: float | None, weights=None, schedule=None) -> Path | None:
        """The shipped ScaleKV plan for ``budget`` (None: 10%) and ``schedule`` (None: the default), or None."""
        from .cache.plan import PLANS_DIR

        budget = 0.1 if budget is None else budget
        percent = round(budget * 100)
        if abs(budget * 100 - percent) > 1e-9:
            return None
        name = dict(self.plans).get(percent)
        if name is None:
            return None
        if self.plan_size is not None and schedule is not None:
            from .schedules import parse_size, schedule_for_size

            if schedule != schedule_for_size(*parse_size(self.plan_size)):
                return None
        base = (Path(weights) if weights else self.folder) if self.plans_in_folder else PLANS_DIR
        path = base / name
        return path if path.is_file() else None


def _var_entry(name: str) -> ModelEntry:
    cfg = VAR_PRESETS[name]
    return ModelEntry(
        name,
        "var",
        LABELS,
        lambda weights=None, **files: VARPipeline.from_pretrained(name, weights, **files),
        preset=cfg,
        weight_files=(f"var_d{cfg.depth}.pth", f"var_d{cfg.depth}.safetensors"),
        tokenizer_files=("vae_ch160v4096z32.pth", "vae_ch160v4096z32.safetensors"),
        sampling=VAR_SAMPLING,
    )


def _infinity_entry(name: str) -> ModelEntry:
    files, vae = OFFICIAL_FILES.get(name, (("<weights folder with config.json>",), None))
    released = {"infinity-2b": "infinity_2b_10pct.json", "infinity-8b": "infinity_8b_10pct.json"}.get(name)
    return ModelEntry(
        name,
        "infinity",
        PROMPTS,
        lambda weights=None, **more: InfinityPipeline.from_pretrained(name, weights, **more),
        preset=INFINITY_PRESETS.get(name),
        weight_files=tuple(files),
        tokenizer_files=(f"{vae}.pth",) if vae else (),
        sampling=INFINITY_SAMPLING,
        size=INFINITY_SIZE,
        plans=((10, released),) if released else (),
        plan_size=INFINITY_SIZE,
    )


def _demo_entry() -> ModelEntry:
    from .data import CLASSES

    def load(weights=None, **files):
        if files:
            raise ValueError(f"model 'demo' takes a weights folder only, not {sorted(files)}")
        return load_demo(weights)

    return ModelEntry(
        DEMO,
        "var",
        LABELS,
        load,
        weight_files=("var.safetensors", "config.json"),
        tokenizer_files=("vae.safetensors",),
        plans=tuple((p, f"plans/scalekv_{p}pct.json") for p in (4, 10, 20)),
        plans_in_folder=True,
        head_stats="plans/head_stats.json",
        class_names=CLASSES,
        folder=DEMO_DIR,
    )


MODELS: dict[str, ModelEntry] = {
    **{name: _var_entry(name) for name in VAR_PRESETS},
    DEMO: _demo_entry(),
    **{name: _infinity_entry(name) for name in ("infinity", *sorted(INFINITY_PRESETS))},
}


def model_names() -> list[str]:
    return sorted(MODELS)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a clear error listing the names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {model_names()}")
    return MODELS[name]


def input_kind(model: str) -> str:
    """What ``model`` generates from: its entry's ``"labels"`` or ``"prompts"``; a name outside the registry (a
    pipeline handed to the evaluation directly) is taken as class-conditional."""
    return MODELS[model].input_kind if model in MODELS else LABELS


def default_sampling(model: str, weights: str | Path | None = None) -> dict:
    """Sampling settings of a model (its entry's; VAR's official ones for a name outside the registry)."""
    return MODELS[model].sampling_for(weights) if model in MODELS else dict(VAR_SAMPLING)


def default_plan(model: str, budget: float | None, weights: str | Path | None = None, schedule=None) -> Path | None:
    """The ScaleKV plan shipped for ``model`` at ``budget`` (None: 10%), or None where there is none: the demo's
    calibrated plans at 4/10/20% (in its folder, or beside ``weights``), the released Infinity 2B/8B 10% files on
    the 1024x1024 schedule."""
    return MODELS[model].plan_path(budget, weights, schedule) if model in MODELS else None


HEAD_AWARE = ("hack", "heatkv", "ams_kv")  # the policies that read per-head statistics (``calibration``)


def default_head_stats(model: str, weights: str | Path | None = None) -> Path | None:
    """The per-head statistics shipped for ``model`` (the demo: ``plans/head_stats.json``, made by ``scalekv
    calibrate --method hack``), or None."""
    return MODELS[model].head_stats_path(weights) if model in MODELS else None


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
    it is optional and defaults to the copy shipped inside the package); ``files`` name single files (VAR:
    ``var_file``, ``vae_file``; Infinity: ``vae``, ``t5``)."""
    return model_entry(name).load(weights, **files)
