"""Prompt -> T5 features, as the official Infinity inference does it (flan-t5-xl through ``transformers``).

Nothing is downloaded: the encoder and tokenizer are read from a local folder the user supplies (the layout
``save_pretrained`` writes). ``transformers`` is an optional dependency (``pip install scalekv[infinity]``); the core
package imports without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.infinity import TextBatch


class T5TextEncoder:
    """``T5EncoderModel`` + tokenizer from ``folder``, producing compact :class:`TextBatch` features.

    Like the reference: the tokenizer is loaded with ``legacy=True``; prompts are padded to ``max_length`` (512) and
    truncated to it; the features are ``last_hidden_state`` cast to float32, and each prompt keeps its valid tokens
    (``</s>`` included), so its length is ``attention_mask.sum()``. The reference runs the encoder in float16 on the
    GPU; ``dtype`` defaults to float16 on CUDA and float32 elsewhere.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        folder = Path(folder)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"T5 folder {str(folder)!r} does not exist or holds no config.json: expected a local flan-t5-xl "
                "folder (tokenizer + encoder weights, as written by save_pretrained); nothing is downloaded"
            )
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:
            raise ImportError("T5 text encoding needs transformers: pip install 'scalekv[infinity]'") from e
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive token count")
        device = torch.device(device)
        dtype = dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(folder), legacy=True, model_max_length=max_length, local_files_only=True
        )
        self.model = T5EncoderModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        self.model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> T5TextEncoder:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> TextBatch:
        """Encode ``prompts`` -> :class:`TextBatch` (features (sum of lens, d_model) float32, lens (B,))."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts {prompts!r}: expected a non-empty list of strings")
        tokens = self.tokenizer(
            prompts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return TextBatch(hidden[mask.bool()], mask.sum(-1))
