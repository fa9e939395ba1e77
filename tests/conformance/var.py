"""Checks a VAR fixture directory as its README specifies (teacher-forced logits, greedy tokens, images, RNG)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from scalekv.checkpoint import load_strict, read_state_file
from scalekv.models import VAR, VQVAE, VARConfig, VQVAEConfig
from scalekv.pipeline import VARPipeline

MODEL_PREFIX = "VAR"

# acceptance thresholds suggested by the fixture README (the reference's own spread is below them)
TOL_TF_LOGITS = 2e-5
TOL_GUIDED = 5e-5
TOL_FHAT = 1e-5
TOL_IMG = 1e-4


def build(fixture: Path) -> tuple[dict, VARPipeline]:
    cfg = json.loads((fixture / "config.json").read_text())
    v, q = cfg["var"], cfg["vqvae"]
    var_cfg = VARConfig(
        depth=v["depth"],
        embed_dim=v["embed_dim"],
        num_heads=v["num_heads"],
        mlp_ratio=v["mlp_ratio"],
        num_classes=v["num_classes"],
        vocab_size=q["vocab_size"],
        z_channels=q["Cvae"],
        patch_nums=tuple(v["patch_nums"]),
        shared_aln=v["shared_aln"],
        attn_l2_norm=v["attn_l2_norm"],
        norm_eps=v["norm_eps"],
    )
    vae_cfg = VQVAEConfig(
        vocab_size=q["vocab_size"],
        z_channels=q["Cvae"],
        ch=q["ch"],
        ch_mult=tuple(q["ch_mult"]),
        num_res_blocks=q["num_res_blocks"],
        using_sa=q["using_sa"],
        using_mid_sa=q["using_mid_sa"],
        share_quant_resi=q["share_quant_resi"],
        quant_resi=q["quant_resi"],
        patch_nums=tuple(q["v_patch_nums"]),
        with_encoder=False,
    )
    model, vae = VAR(var_cfg), VQVAE(vae_cfg)
    load_strict(model, read_state_file(fixture / cfg["transformer_weights"]["file"]), what="VAR fixture")
    load_strict(
        vae,
        read_state_file(fixture / cfg["vqvae_weights"]["file"]),
        what="VQVAE fixture",
        ignore_prefixes=("encoder.", "quant_conv."),
    )
    assert vae.quantize.phi_index == q["phi_index_per_scale"]
    return cfg, VARPipeline(model, vae)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_teacher_forcing(fixture: Path) -> None:
    cfg, pipe = build(fixture)
    cs = load_file(str(fixture / "cases.safetensors"))
    with torch.no_grad():
        logits = pipe.model(cs["tf.label"], cs["tf.x_BLCv"])
    assert _max_err(logits.gather(-1, cs["tf.logits.top_idx"]), cs["tf.logits.top_val"]) <= TOL_TF_LOGITS
    assert _max_err(logits.logsumexp(-1), cs["tf.logits.lse"]) <= TOL_TF_LOGITS
    assert _max_err(logits[:, cs["tf.logits.full_pos"]], cs["tf.logits.full"]) <= TOL_TF_LOGITS
    # the tokenizer side: quantising the stored latent gives the stored tokens and latent, and the
    # teacher-forcing inputs built from those tokens are the stored ones
    idx, f_hat = pipe.vae.quantize.quantize(cs["tf.latent_f"])
    assert torch.equal(torch.cat(idx, dim=1), cs["tf.idx"])
    assert _max_err(f_hat, cs["tf.f_hat"]) <= TOL_FHAT
    per_scale = [cs["tf.idx"][:, s.start : s.end] for s in pipe.model.cfg.scales]
    assert _max_err(pipe.vae.quantize.teacher_inputs(per_scale), cs["tf.x_BLCv"]) <= TOL_FHAT


def check_generation(fixture: Path, case: str) -> None:
    cfg, pipe = build(fixture)
    cs = load_file(str(fixture / "cases.safetensors"))
    s = cfg["sampling"][case]
    gen = pipe.generate(
        cs[f"{case}.label"],
        cfg=s["cfg"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        seed=s["g_seed"],
        keep_logits=True,
        seeding="batch",
    )
    assert torch.equal(gen.tokens, cs[f"{case}.idx"]), f"{case}: tokens differ from the reference"
    assert _max_err(gen.f_hat, cs[f"{case}.f_hat"]) <= TOL_FHAT
    if f"{case}.guided.top_val" in cs:
        guided = torch.cat(gen.logits, dim=1)
        assert _max_err(guided.gather(-1, cs[f"{case}.guided.top_idx"]), cs[f"{case}.guided.top_val"]) <= TOL_GUIDED
        assert _max_err(guided.logsumexp(-1), cs[f"{case}.guided.lse"]) <= TOL_GUIDED
    if f"{case}.img" in cs:
        ref = cs[f"{case}.img"]
        assert _max_err(gen.images[: ref.shape[0]], ref) <= TOL_IMG


def cases(fixture: Path) -> dict[str, callable]:
    """Every check this fixture supports, by name."""
    cfg = json.loads((fixture / "config.json").read_text())
    out = {"teacher_forcing": lambda: check_teacher_forcing(fixture)}
    for case in cfg["sampling"]:
        out[f"generate[{case}]"] = lambda case=case: check_generation(fixture, case)
    return out
