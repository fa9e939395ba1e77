"""Checkpoint-faithful next-scale models and their tokenizers."""

from .var import VAR, VAR_PRESETS, VARConfig, load_var
from .vqvae import VQVAE, VQVAE_PRESETS, VQVAEConfig, load_vqvae

__all__ = ["VAR", "VAR_PRESETS", "VARConfig", "VQVAE", "VQVAE_PRESETS", "VQVAEConfig", "load_var", "load_vqvae"]
