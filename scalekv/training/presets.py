"""The demo model's configs: 24x24 grayscale Fashion-MNIST, a stride-2 tokenizer (12x12 latent) and
9 scales 1,2,3,4,5,6,8,10,12 (1+4+9+16+25+36+64+100+144 = 399 tokens). ``tiny`` is for tests."""

from __future__ import annotations

from dataclasses import replace

from ..models.var import VARConfig
from ..models.vqvae import VQVAEConfig
from .common import OptimConfig

DEMO_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 12)
TINY_PATCH_NUMS = (1, 2, 4, 6)

_DEMO_TOKENIZER = VQVAEConfig(
    vocab_size=512,
    z_channels=16,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    in_channels=1,
    using_sa=False,
    using_mid_sa=False,
    share_quant_resi=4,
    quant_resi=0.5,
    patch_nums=DEMO_PATCH_NUMS,
)

TOKENIZER_PRESETS: dict[str, VQVAEConfig] = {
    "demo": _DEMO_TOKENIZER,
    "demo-small": _DEMO_TOKENIZER,
    "tiny": replace(_DEMO_TOKENIZER, vocab_size=32, z_channels=4, share_quant_resi=2, patch_nums=TINY_PATCH_NUMS),
}

# The demo model: deep enough for layers to specialise (the drafter/refiner question needs depth).
_DEMO_VAR = VARConfig(
    depth=16, embed_dim=128, num_heads=4, num_classes=10, vocab_size=512, z_channels=16, patch_nums=DEMO_PATCH_NUMS
)

VAR_TRAIN_PRESETS: dict[str, VARConfig] = {
    "demo": _DEMO_VAR,
    "demo-small": replace(_DEMO_VAR, depth=6, num_heads=2),  # the first, 6-layer demo model
    "tiny": VARConfig(
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=10,
        vocab_size=32,
        z_channels=4,
        patch_nums=TINY_PATCH_NUMS,
    ),
}

TOKENIZER_OPTIM: dict[str, OptimConfig] = {
    "demo": OptimConfig(steps=1500, batch_size=64, lr=1e-3, weight_decay=0.0, warmup=100),
    "demo-small": OptimConfig(steps=1500, batch_size=64, lr=1e-3, weight_decay=0.0, warmup=100),
    "tiny": OptimConfig(steps=4, batch_size=8, lr=1e-3, weight_decay=0.0, warmup=1),
}

VAR_OPTIM: dict[str, OptimConfig] = {
    "demo": OptimConfig(steps=3000, batch_size=32, lr=1e-3, weight_decay=0.05, warmup=100),
    "demo-small": OptimConfig(steps=1200, batch_size=32, lr=1.5e-3, weight_decay=0.05, warmup=100),
    "tiny": OptimConfig(steps=4, batch_size=8, lr=1e-3, weight_decay=0.05, warmup=1),
}
