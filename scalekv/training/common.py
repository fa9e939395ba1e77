"""What both training stages share: the run folder, atomic resumable checkpoints, seeded batches, LR schedule.

A run folder holds ``config.json`` (the model config and hyper-parameters, written once), ``last.pt`` (model,
optimiser, step; replaced atomically every ``save_every`` steps and at the end) and ``train.log``. Re-running the
same command resumes from ``last.pt``; a different config in the same folder is refused, except for the total
number of steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_write_text


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of one training stage."""

    steps: int  # optimiser steps in the whole run
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup: int = 100  # steps of linear warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at ``steps``
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}: expected positive integers")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: expected a positive learning rate")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def config_to_json(cfg) -> dict:
    """A frozen config dataclass as JSON-ready data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(cls, data: dict):
    """Inverse of :func:`config_to_json` for a dataclass ``cls``; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; expected a subset of {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _without_steps(config: dict) -> dict:
    """The run config minus the total step count, which a resumed run may change (to extend or shorten it; the
    cosine schedule then follows the new total)."""
    optim = {k: v for k, v in config.get("optim", {}).items() if k != "steps"}
    return {**config, "optim": optim}


class Run:
    """A training run folder: config guard, checkpoints, log."""

    def __init__(self, folder: str | Path, config: dict) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg_path = self.folder / "config.json"
        if cfg_path.is_file():
            old = json.loads(cfg_path.read_text())
            if _without_steps(old) != _without_steps(config):
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ValueError(
                    f"run folder {str(self.folder)!r} holds a run with a different config (differs in {changed}); "
                    "use a new --run folder or the same settings to resume (only --steps may change)"
                )
        atomic_write_text(cfg_path, json.dumps(config, indent=1, sort_keys=True))
        self.ckpt = self.folder / "last.pt"
        self.log_path = self.folder / "train.log"

    def log(self, line: str) -> None:
        with self.log_path.open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, seconds: float, extra=None) -> None:
        """Write ``last.pt`` atomically (temporary file, then rename)."""
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}
        if extra is not None:
            state["extra"] = extra
        from ..atomic import atomic_write

        atomic_write(self.ckpt, lambda f: torch.save(state, f))

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float, dict | None]:
        """Load ``last.pt`` if present; returns (next step, training seconds so far, extra state)."""
        if not self.ckpt.is_file():
            return 0, 0.0, None
        state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        return int(state["step"]), float(state["seconds"]), state.get("extra")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The example indices of optimiser step ``step``: epochs are seeded permutations of ``range(n)``, so a
    resumed run sees exactly the batches an uninterrupted one would. Returns ``(batch_size,)`` int64."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} examples)")
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step (class dropout, code restarts), independent of where a run resumed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 1)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def scheduled_steps(opt: torch.optim.Optimizer, cfg: OptimConfig, start: int, progress: bool, desc: str):
    """Steps ``start .. cfg.steps - 1``, each after setting its learning rate; a tqdm bar when ``progress``.
    Yields ``(step, bar)``."""
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc=desc, dynamic_ncols=True
    )
    for step in bar:
        set_lr(opt, cfg.lr_at(step))
        yield step, bar


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 2.0) -> None:
    """Backpropagate ``loss``, clip the gradient norm to ``clip`` and step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def make_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings of position/level or scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not any(s in name for s in ("pos_", "lvl_embed", "scale_mul", "embedding"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
