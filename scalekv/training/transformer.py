"""Training the class-conditional VAR on a trained tokenizer's tokens, and exporting the demo model.

The training set is tokenised once (``tokens.pt`` in the run folder, ``(N, L)`` int16). Each step rebuilds the
teacher-forcing inputs with :meth:`MultiScaleQuantizer.teacher_inputs`, replaces labels by the null class with
probability ``cond_drop`` (so classifier-free guidance works), and minimises the mean cross-entropy over all ``L``
tokens of :meth:`VAR.forward` under the block-causal mask.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..checkpoint import save_state_file
from ..models.var import VAR, VARConfig
from ..models.vqvae import VQVAE, VQVAEConfig
from .common import (
    OptimConfig,
    Run,
    batch_indices,
    config_from_json,
    config_to_json,
    make_adamw,
    optimizer_step,
    scheduled_steps,
    step_generator,
)


def _load_run_model(run_dir: str | Path, stage: str, cls_cfg, cls_model):
    folder = Path(run_dir)
    cfg_path, ckpt = folder / "config.json", folder / "last.pt"
    if not cfg_path.is_file() or not ckpt.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a trained {stage} run (expected config.json and last.pt)")
    from ..checkpoint import load_pickle, read_json

    meta = read_json(cfg_path, f"{stage} run config")
    if meta.get("stage") != stage:
        raise ValueError(f"{str(folder)!r} is a {meta.get('stage')!r} run, expected a {stage!r} run")
    model = cls_model(config_from_json(cls_cfg, meta["model"]))
    state = load_pickle(ckpt)
    model.load_state_dict(state["model"])
    return model.eval(), int(state["step"]), float(state["seconds"])


def _tokenizer_with_record(source: str | Path) -> tuple[VQVAE, int, float]:
    """The tokenizer of a run folder (its latest checkpoint) or of an exported folder (with its encoder), with the
    training steps and seconds behind it."""
    folder = Path(source)
    if (folder / "vae.safetensors").is_file():
        from ..checkpoint import read_json

        record = read_json(folder / "config.json", "exported model config").get("training", {})
        vae = load_export(folder)[0]
        return vae, int(record.get("tokenizer_steps", 0)), float(record.get("tokenizer_seconds", 0.0))
    return _load_run_model(folder, "tokenizer", VQVAEConfig, VQVAE)


def load_tokenizer_run(source: str | Path) -> VQVAE:
    """The tokenizer of a ``scalekv train tokenizer`` run folder (its latest checkpoint) or of a folder written by
    :func:`export_demo` with its encoder (e.g. the shipped demo model), in eval mode."""
    return _tokenizer_with_record(source)[0]


def load_var_run(run_dir: str | Path) -> VAR:
    """The VAR of a ``scalekv train var`` run folder (its latest checkpoint), in eval mode."""
    return _load_run_model(run_dir, "var", VARConfig, VAR)[0]


def load_export(folder: str | Path) -> tuple[VQVAE, VAR]:
    """The tokenizer and transformer of a folder written by :func:`export_demo` (e.g. the shipped demo model), to
    continue training from: the tokenizer must have been exported with its encoder."""
    from ..hub import load_pipeline

    pipe = load_pipeline("demo", str(folder))
    if not pipe.vae.cfg.with_encoder:
        raise ValueError(
            f"{str(folder)!r} holds a decode-only tokenizer (exported without its encoder): it cannot tokenise "
            "training images; export again from the tokenizer's run folder"
        )
    return pipe.vae.eval(), pipe.model.eval()


def exported_training(folder: str | Path) -> dict:
    """The training record (``config.json``'s ``training``: steps and seconds of each stage) of a folder written by
    :func:`export_demo`, which a warm restart from it carries forward so that the next export counts all of it."""
    from ..checkpoint import read_json

    record = read_json(Path(folder) / "config.json", "exported model config").get("training")
    if not isinstance(record, dict) or not isinstance(record.get("var_steps"), int):
        raise ValueError(f"{str(folder)!r}: its config.json has no training record (expected 'training.var_steps')")
    return record


@torch.no_grad()
def tokenize(vae: VQVAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Token ids of every scale, concatenated scale-major: ``(N, L)`` int16 for images ``(N, C, H, W)``."""
    if vae.cfg.vocab_size > 2**15:
        raise ValueError(f"vocab_size {vae.cfg.vocab_size} does not fit int16 token storage")
    out = []
    for i in range(0, images.shape[0], batch_size):
        idx = vae.img_to_idx(images[i : i + batch_size])
        out.append(torch.cat(idx, dim=1).to(torch.int16))
    return torch.cat(out)


def split_scales(tokens: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    """``(B, L)`` concatenated ids -> per-scale ``(B, pn*pn)`` int64 ids."""
    return list(tokens.long().split([p * p for p in patch_nums], dim=1))


def init_var_for_training(model: VAR, std: float | None = None) -> None:
    """VAR's training initialisation: truncated-normal linears/embeddings (std ``sqrt(1/(3C))``), zero biases,
    output projections scaled by ``1/sqrt(2 depth)``, a small head, and AdaLN gammas starting near zero (the
    gamma rows of ``ada_lin`` scaled by 1e-5 with zero bias), so every block starts close to the identity."""
    c, depth = model.cfg.embed_dim, model.cfg.depth
    std = std if std is not None else (1 / c / 3) ** 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.trunc_normal_(m.weight, std=std)
    with torch.no_grad():
        model.head.weight.mul_(0.02)
        for block in model.blocks:
            block.attn.proj.weight.div_((2 * depth) ** 0.5)
            block.ffn.fc2.weight.div_((2 * depth) ** 0.5)
            if not model.cfg.shared_aln:
                lin = block.ada_lin[-1]
                lin.weight[: 2 * c].mul_(1e-5)
                lin.weight[2 * c :].mul_(0.5)
        model.head_nm.ada_lin[-1].weight.mul_(0.5)


def _tokens_for(run: Run, vae: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """Tokenise ``images`` once per run; the cache is keyed by the tokenizer's weights and the image count."""
    key = float(sum(p.detach().double().sum() for p in vae.parameters()))
    path = run.folder / "tokens.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key and saved["tokens"].shape[0] == images.shape[0]:
            return saved["tokens"]
        raise ValueError(f"{str(path)!r} was made with another tokenizer or data set; use a new --run folder")
    tokens = tokenize(vae, images)
    from ..atomic import atomic_write

    atomic_write(path, lambda f: torch.save({"key": key, "tokens": tokens}, f))
    return tokens


def var_loss(model: VAR, vae: VQVAE, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-scale cross-entropy of ``model`` on concatenated ids ``tokens`` (B, L) for ``labels`` (B,)."""
    idx = split_scales(tokens, model.cfg.patch_nums)
    with torch.no_grad():
        x = vae.quantize.teacher_inputs(idx)  # (B, L - 1, Cvae)
    logits = model(labels, x)  # (B, L, V)
    target = torch.cat(idx, dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train_var(
    cfg: VARConfig,
    opt_cfg: OptimConfig,
    vae: VQVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    run_dir: str | Path,
    *,
    cond_drop: float = 0.1,
    save_every: int = 100,
    progress: bool = True,
    init: VAR | None = None,
    init_source: str = "",
    init_training: dict | None = None,
) -> VAR:
    """Train (or resume) a VAR on the tokens of ``images`` (N, C, H, W) with ``labels`` (N,); returns it in eval.

    ``init``: start from this model's weights instead of VAR's initialisation (a fresh optimiser and schedule: a
    warm restart), recorded in the run's config as ``init_source``; a run that resumes continues from its own
    checkpoint. ``init_training``: the training record behind ``init`` (:func:`exported_training`), kept in the run's
    config so that :func:`export_demo` reports the steps and seconds of every run that made the weights."""
    if (cfg.vocab_size, cfg.z_channels, tuple(cfg.patch_nums)) != (
        vae.cfg.vocab_size,
        vae.cfg.z_channels,
        tuple(vae.cfg.patch_nums),
    ):
        raise ValueError(f"VAR config {cfg} does not match the tokenizer's vocabulary/code channels/patch_nums")
    if not 0 <= cond_drop < 1:
        raise ValueError(f"cond_drop={cond_drop}: expected a probability in [0, 1)")
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], expected ids in [0, {cfg.num_classes - 1}]")
    torch.manual_seed(opt_cfg.seed)
    model = VAR(cfg)
    if init is None:
        init_var_for_training(model)
    elif init.cfg != cfg:
        raise ValueError(f"the initial weights' config {init.cfg} is not the preset's {cfg}")
    else:
        model.load_state_dict(init.state_dict())
    run = Run(
        run_dir,
        {
            "stage": "var",
            "model": config_to_json(cfg),
            "optim": config_to_json(opt_cfg),
            "cond_drop": cond_drop,
            "examples": int(images.shape[0]),
            **({"init": init_source or "given weights"} if init is not None else {}),
            **({"init_training": init_training} if init_training is not None else {}),
        },
    )
    vae = vae.eval().requires_grad_(False)
    tokens = _tokens_for(run, vae, images)
    opt = make_adamw(model, opt_cfg)
    start, seconds, _ = run.resume(model, opt)
    model.train()
    t0, ema = time.perf_counter() - seconds, None
    for step, bar in scheduled_steps(opt, opt_cfg, start, progress, "var"):
        sel = batch_indices(tokens.shape[0], opt_cfg.batch_size, step, opt_cfg.seed)
        y = labels[sel].clone()
        drop = torch.rand(y.shape, generator=step_generator(opt_cfg.seed, step)) < cond_drop
        y[drop] = cfg.num_classes
        loss = var_loss(model, vae, tokens[sel], y)
        optimizer_step(model, opt, loss)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        done = step + 1
        if progress:
            bar.set_postfix(loss=f"{loss.item():.3f}", ema=f"{ema:.3f}")
        if done % save_every == 0 or done == opt_cfg.steps:
            run.log(f"step {done} loss {loss.item():.4f} ema {ema:.4f} ({time.perf_counter() - t0:.0f} s)")
            run.save(model, opt, done, time.perf_counter() - t0)
    return model.eval()


def export_demo(
    tokenizer_run: str | Path,
    var_run: str | Path,
    out: str | Path,
    sampling: dict | None = None,
    with_encoder: bool = True,
) -> list[Path]:
    """Write ``var.safetensors``, ``vae.safetensors`` (float32) and ``config.json`` into ``out``: the folder
    :func:`scalekv.hub.load_pipeline` reads for ``"demo"``. ``sampling`` (``cfg``, ``top_k``, ``top_p``) is stored
    as the model's default sampling settings, which ``scalekv demo`` uses. ``with_encoder``: keep the tokenizer's
    encoder (not needed to generate), so that training can continue from the exported folder alone."""
    from ..checkpoint import read_json
    from ..generation import check_sampling

    sampling = dict(sampling or {"cfg": 1.5, "top_k": 900, "top_p": 0.96})
    if sorted(sampling) != ["cfg", "top_k", "top_p"]:
        raise ValueError(f"sampling {sampling}: expected exactly the keys cfg, top_k, top_p")
    check_sampling(**sampling)
    vae, vae_step, vae_sec = _tokenizer_with_record(tokenizer_run)
    var, var_step, var_sec = _load_run_model(var_run, "var", VARConfig, VAR)
    # a warm restart from an export carries that export's record: count every run behind these weights
    before = read_json(Path(var_run) / "config.json", "var run config").get("init_training") or {}
    earlier = before.get("var_runs") or ([before["var_steps"]] if "var_steps" in before else [])
    var_runs = [*earlier, var_step]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    vae_state = vae.state_dict()
    if not with_encoder:
        vae_state = {k: v for k, v in vae_state.items() if not k.startswith(("encoder.", "quant_conv."))}
    meta = {
        "var": config_to_json(var.cfg),
        "vae": {**config_to_json(vae.cfg), "with_encoder": with_encoder},
        "sampling": sampling,
        "training": {
            "tokenizer_steps": vae_step,
            "tokenizer_seconds": round(vae_sec),
            "var_steps": sum(var_runs),
            "var_seconds": round(var_sec) + before.get("var_seconds", 0),
            "var_runs": var_runs,  # steps of each run, warm restarts from an export after the first
        },
    }
    paths = [folder / "var.safetensors", folder / "vae.safetensors", folder / "config.json"]
    save_state_file(var.state_dict(), paths[0])
    save_state_file(vae_state, paths[1])
    atomic_write_text(paths[2], json.dumps(meta, indent=1) + "\n")
    return paths
