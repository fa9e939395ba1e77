"""Tiny models shared by the tests (random weights, seconds to run)."""

from __future__ import annotations

from scalekv.models import VARConfig, VQVAEConfig
from scalekv.pipeline import VARPipeline, random_pipeline

TINY_PN = (1, 2, 3, 4, 5, 6)


def tiny_var_config(**overrides) -> VARConfig:
    base = dict(depth=3, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=TINY_PN)
    base.update(overrides)
    return VARConfig(**base)


def tiny_vae_config(**overrides) -> VQVAEConfig:
    base = dict(
        vocab_size=64,
        z_channels=8,
        ch=32,
        ch_mult=(1, 1),
        num_res_blocks=1,
        using_sa=False,
        patch_nums=TINY_PN,
        with_encoder=True,
    )
    base.update(overrides)
    return VQVAEConfig(**base)


def tiny_pipeline(seed: int = 0, **var_overrides) -> VARPipeline:
    var_cfg = tiny_var_config(**var_overrides)
    return random_pipeline(var_cfg, tiny_vae_config(patch_nums=var_cfg.patch_nums), seed=seed)


# what the head-aware policies need beyond a budget when no calibration is at hand (valid for any model)
HEAD_AWARE_KWARGS = {"hack": {"contextual": [[0, 0]]}, "ams_kv": {"demanding": [0]}, "heatkv": {"seed": 0}}
