"""Training the multi-scale residual VQ tokenizer (:class:`~scalekv.models.vqvae.VQVAE`).

Loss = L1 + L2 reconstruction + VAR's quantiser loss: per scale ``beta * |sg(f_hat) - f|^2`` (commitment, to the
encoder) ``+ |f_hat - sg(f)|^2`` (codebook and Phi convolutions), averaged over the scales, ``beta = 0.25``.
The decoder sees ``f + sg(f_hat - f)`` (straight-through). Codes unused for ``restart_every`` steps are re-seeded
from the current batch's residuals, which keeps the whole vocabulary in use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.vqvae import VQVAE, MultiScaleQuantizer, VQVAEConfig
from .common import (
    OptimConfig,
    Run,
    batch_indices,
    config_to_json,
    make_adamw,
    optimizer_step,
    scheduled_steps,
    step_generator,
)


@dataclass
class QuantizeOutput:
    f_hat: torch.Tensor  # (B, Cvae, P, P) straight-through latent: value of f_hat, gradient of f
    vq_loss: torch.Tensor  # scalar
    hits: torch.Tensor  # (V,) int64 codebook hits over all scales
    residuals: torch.Tensor  # (N, Cvae) residual vectors the codes were matched against (detached)


def quantize_train(q: MultiScaleQuantizer, f: torch.Tensor, beta: float = 0.25) -> QuantizeOutput:
    """Multi-scale residual quantisation of ``f`` ``(B, Cvae, P, P)`` with the training losses (see module doc)."""
    n, full = len(q.patch_nums), q.patch_nums[-1]
    b, c = f.shape[:2]
    f_ng = f.detach()
    f_rest, f_hat = f_ng.clone(), torch.zeros_like(f)
    w = q.embedding.weight.detach()
    loss, hits, residuals = f.new_zeros(()), torch.zeros(w.shape[0], dtype=torch.long), []
    for si, pn in enumerate(q.patch_nums):
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != n - 1 else f_rest
        z = z.permute(0, 2, 3, 1).reshape(-1, c)
        dist = torch.addmm(z.square().sum(1, keepdim=True) + w.square().sum(1), z, w.T, alpha=-2)
        idx = dist.argmin(dim=1)
        hits += torch.bincount(idx, minlength=w.shape[0])
        residuals.append(z)
        h = q.codes_to_contribution(si, idx.view(b, pn * pn))
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        loss = loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
    assert f_hat.shape[-1] == full
    return QuantizeOutput((f_hat.detach() - f_ng) + f, loss / n, hits, torch.cat(residuals))


@torch.no_grad()
def restart_dead_codes(q: MultiScaleQuantizer, usage: torch.Tensor, residuals: torch.Tensor, gen) -> int:
    """Re-seed codes with ``usage == 0`` from random ``residuals`` ``(N, Cvae)``; returns how many."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel():
        pick = torch.randint(0, residuals.shape[0], (dead.numel(),), generator=gen)
        q.embedding.weight[dead] = residuals[pick]
    return int(dead.numel())


def reconstruct(vae: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """Encode, quantise at every scale and decode: ``(B, C, H, W)`` in [-1, 1] -> the same shape."""
    _, f_hat = vae.quantize.quantize(vae.encode(images))
    return vae.decode(f_hat)


def psnr_dataset(vae: VQVAE, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean per-image PSNR (dB) of the tokenizer's reconstructions of ``images`` in [-1, 1], on [0, 1] pixels."""
    vals = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            mse = (reconstruct(vae, x) - x).div(2).square().flatten(1).mean(1)
            vals.append(-10 * torch.log10(mse.clamp_min(1e-10)))
    return torch.cat(vals).mean().item()


def train_tokenizer(
    cfg: VQVAEConfig,
    opt_cfg: OptimConfig,
    images: torch.Tensor,
    run_dir: str | Path,
    *,
    beta: float = 0.25,
    restart_every: int = 100,
    save_every: int = 100,
    eval_images: torch.Tensor | None = None,
    progress: bool = True,
) -> VQVAE:
    """Train (or resume) a tokenizer on ``images`` ``(N, C, H, W)`` in [-1, 1]; returns the model in eval mode."""
    if tuple(images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(
            f"images of shape {tuple(images.shape[1:])}, expected {(cfg.in_channels, cfg.image_size, cfg.image_size)}"
        )
    torch.manual_seed(opt_cfg.seed)
    vae = VQVAE(cfg)
    run = Run(
        run_dir,
        {
            "stage": "tokenizer",
            "model": config_to_json(cfg),
            "optim": config_to_json(opt_cfg),
            "beta": beta,
            "restart_every": restart_every,
        },
    )
    opt = make_adamw(vae, opt_cfg)
    start, seconds, extra = run.resume(vae, opt)
    usage = extra["usage"] if extra else torch.zeros(cfg.vocab_size, dtype=torch.long)
    if start == 0:  # seed the codebook with real latents instead of noise
        with torch.no_grad():
            first = images[batch_indices(images.shape[0], opt_cfg.batch_size, 0, opt_cfg.seed)]
            z = vae.encode(first).permute(0, 2, 3, 1).reshape(-1, cfg.z_channels)
            pick = torch.randint(0, z.shape[0], (cfg.vocab_size,), generator=step_generator(opt_cfg.seed, -1))
            vae.quantize.embedding.weight.copy_(z[pick] * 0.5)
    vae.train()
    t0 = time.perf_counter() - seconds
    for step, bar in scheduled_steps(opt, opt_cfg, start, progress, "tokenizer"):
        x = images[batch_indices(images.shape[0], opt_cfg.batch_size, step, opt_cfg.seed)]
        out = quantize_train(vae.quantize, vae.encode(x), beta)
        rec = vae.decoder(vae.post_quant_conv(out.f_hat))
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + out.vq_loss
        optimizer_step(vae, opt, loss)
        usage += out.hits
        restarted = 0
        if (step + 1) % restart_every == 0:
            restarted = restart_dead_codes(vae.quantize, usage, out.residuals, step_generator(opt_cfg.seed, step))
            used = int((usage > 0).sum())
            usage.zero_()
        done = step + 1
        if progress:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{out.vq_loss.item():.4f}")
        if done % save_every == 0 or done == opt_cfg.steps:
            msg = f"step {done} rec {rec_loss.item():.4f} vq {out.vq_loss.item():.4f}"
            if (step + 1) % restart_every == 0:
                msg += f" codes used {used}/{cfg.vocab_size} restarted {restarted}"
            if eval_images is not None:
                vae.eval()
                msg += f" test PSNR {psnr_dataset(vae, eval_images):.2f} dB"
                vae.train()
            run.log(msg + f" ({time.perf_counter() - t0:.0f} s)")
            run.save(vae, opt, done, time.perf_counter() - t0, extra={"usage": usage})
    return vae.eval()
