"""Text-to-image generation with Infinity + its BSQ-VAE (+ optionally flan-T5), against any cache policy."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache.base import KVCache
from .checkpoint import CheckpointError
from .checks import check_seeding
from .generation import Generation, GenerationLoop, check_sampling, make_generators
from .models.bsq_vae import BSQ_VAE_PRESETS, BSQVAE, BSQVAEConfig, load_bsq_vae, upsample_codes
from .models.infinity import INFINITY_PRESETS, Infinity, InfinityConfig, TextBatch, load_infinity
from .sampling import sample_top_k_top_p
from .schedules import ScaleSchedule, schedule_for_size

# the official weight files of each preset (looked up in the --weights folder) and its VAE preset
OFFICIAL_FILES = {
    "infinity-2b": (["infinity_2b_reg.pth", "infinity_2b_reg.safetensors"], "infinity_vae_d32reg"),
    "infinity-8b": (["infinity_8b_weights", "."], "infinity_vae_d56_f8_14_patchify"),
}
CUSTOM_CONFIG = "config.json"  # a folder for the "infinity" model name: {"infinity": {...}, "vae": {...}}


class InfinityPipeline:
    """An Infinity transformer, its BSQ-VAE and (optionally) a T5 text encoder, ready to generate images."""

    def __init__(self, model: Infinity, vae: BSQVAE, text_encoder=None) -> None:
        if model.cfg.vae_bits != vae.cfg.codebook_dim:
            raise ValueError(
                f"Infinity expects {model.cfg.vae_bits} bits per VAE position (d_vae={model.cfg.d_vae}, "
                f"patchify={model.cfg.patchify}); the VAE has codebook_dim={vae.cfg.codebook_dim}"
            )
        if vae.cfg.patch_size * (2 if model.cfg.patchify else 1) != 16:
            raise ValueError(
                f"VAE patch_size {vae.cfg.patch_size} with patchify={model.cfg.patchify}: the token grid must be "
                "16 pixels per token"
            )
        self.model, self.vae, self.text_encoder = model.eval(), vae.eval(), text_encoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> InfinityPipeline:
        """Move to ``device``. The weights stay float32: for half precision run ``generate`` under
        ``torch.autocast(device_type, torch.bfloat16)``, which is what the reference does."""
        if dtype not in (None, torch.float32):
            raise ValueError(f"dtype={dtype}: Infinity keeps float32 weights; use torch.autocast for bf16/fp16")
        self.model.to(device=device)
        self.vae.to(device=device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        weights: str | Path | None = None,
        *,
        vae: str | Path | None = None,
        t5: str | Path | None = None,
    ) -> InfinityPipeline:
        """Load ``infinity-2b`` / ``infinity-8b`` from the official files, or ``infinity`` (architecture from
        ``weights/config.json``, weights beside it).

        ``weights``: the folder with ``infinity_2b_reg.pth`` (2B) or the 8B safetensors shards (or the file itself);
        ``vae``: the VAE file (``infinity_vae_d32reg.pth`` / ``infinity_vae_d56_f8_14_patchify.pth``);
        ``t5``: a local flan-t5-xl folder (optional; without it, pass :class:`TextBatch` features to generate).
        """
        if weights is None:
            raise CheckpointError(f"no weights given for {name!r}: pass the folder holding its checkpoint files")
        if vae is None:
            raise CheckpointError(f"no VAE file given for {name!r}: pass the BSQ-VAE .pth (e.g. --vae FILE)")
        weights = Path(weights)
        if name == "infinity":
            cfg, vae_cfg = read_custom_config(weights)
            model_path = weights
        elif name in OFFICIAL_FILES:
            cfg = INFINITY_PRESETS[name]
            names, vae_name = OFFICIAL_FILES[name]
            vae_cfg = BSQ_VAE_PRESETS[vae_name]
            model_path = weights if weights.is_file() else _find(weights, names)
        else:
            raise ValueError(f"unknown Infinity model {name!r}: expected one of {infinity_names()}")
        encoder = None
        if t5 is not None:
            from .text import T5TextEncoder

            encoder = T5TextEncoder(t5, max_length=cfg.text_maxlen)
        model = load_infinity(model_path, cfg)
        return cls(model, load_bsq_vae(str(vae), replace(vae_cfg, with_encoder=False)), encoder)

    # -- text ------------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str] | TextBatch) -> TextBatch:
        if isinstance(prompts, TextBatch):
            return prompts
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts {prompts!r}: expected a non-empty list of strings or a TextBatch")
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: load it with t5=FOLDER or pass TextBatch features")
        return self.text_encoder(list(prompts))

    # -- generation ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | TextBatch,
        *,
        schedule: ScaleSchedule | None = None,
        size: tuple[int, int] = (1024, 1024),
        negative_prompts: list[str] | TextBatch | None = None,
        cache: KVCache | None = None,
        cfg: float = 3.0,
        tau: float = 0.5,
        top_k: int = 900,
        top_p: float = 0.97,
        seed: int | list[int] | None = 0,
        keep_logits: bool = False,
        forced_bits: torch.Tensor | None = None,
        seeding: str = "image",
    ) -> Generation:
        """Generate one image per prompt, as the official ``autoregressive_infer_cfg`` with CFG on the logits.

        ``schedule`` (or ``size`` = (height, width) in pixels, mapped by :func:`schedule_for_size`) fixes the
        token maps. Per scale: logits / ``tau``, then ``cfg * cond + (1 - cfg) * uncond`` (constant over scales;
        ``cfg == 1`` runs without unconditional rows, as the reference); every bit is drawn from its logit pair with
        top-k/top-p and ``torch.multinomial`` on the model's device (``top_k=1`` is greedy). ``seeding="image"`` (the
        default) gives image ``i`` its own generator seeded ``seed + i`` (or ``seed[i]`` for a list of one seed per
        prompt), so an image never depends on its batch; ``seeding="batch"`` draws one multinomial per scale for the
        whole batch from one generator seeded ``seed``, as the reference. The next scale's input is the trilinear
        resize of the running code sum.

        Returns a :class:`~scalekv.pipeline.Generation`: RGB images (B, 3, H, W) in [0, 1] (the reference returns
        BGR uint8; see :func:`to_official_uint8`); ``f_hat`` = the decoder input (B, bits, H/16, W/16) (VAE grid,
        twice that with patchify); per scale a :class:`~scalekv.pipeline.ScaleRecord` whose ``tokens`` are the
        sampled bits (B, h*w, d_vae) uint8 on the token grid; ``logits`` the guided logits (B, h*w, 2 d_vae).

        ``forced_bits`` (B, L, d_vae) replaces the sampled bits at every scale (teacher-forced cached inference, the
        reference's ``gt_leak``): the logits are still computed and recorded.
        """
        check_sampling(cfg, top_k, top_p)
        if schedule is None:
            size = check_size(size)
        elif not isinstance(schedule, ScaleSchedule):
            raise ValueError(f"schedule={schedule!r}: expected a ScaleSchedule (or leave it out and give size)")
        m, vae = self.model, self.vae
        if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau={tau!r}: expected a positive temperature")
        schedule = schedule if schedule is not None else schedule_for_size(*size)
        loop = GenerationLoop(cache)
        check_seeding(seeding)
        text = self.encode(prompts)
        negative = self.encode(negative_prompts) if negative_prompts is not None else None
        b, scales, use_cfg = text.batch, schedule.scales, cfg != 1
        gen = make_generators(seed, b, self.device, seeding)
        if forced_bits is not None and tuple(forced_bits.shape) != (b, schedule.total_tokens, m.cfg.d_vae):
            raise ValueError(
                f"forced_bits has shape {tuple(forced_bits.shape)}; expected {(b, schedule.total_tokens, m.cfg.d_vae)}"
            )

        cond = m.condition(text, uncond=use_cfg, negative=negative)
        loop.begin(m.cache_layout(schedule, rows=cond.rows, cond_rows=b))
        rope = m.rope(schedule)
        vae_sizes = schedule.vae_sizes(m.cfg.patchify)
        summed = None
        x = m.first_tokens(cond.cond)
        kept = []
        for scale in scales:
            logits = m.step(x, cond, loop.cache, scale, rope).mul(1 / tau)
            guided = cfg * logits[:b] + (1 - cfg) * logits[b:] if use_cfg else logits
            if keep_logits:
                kept.append(guided.clone())
            if forced_bits is None:
                bits = sample_top_k_top_p(guided.reshape(b, -1, 2), top_k=top_k, top_p=top_p, generator=gen)
                bits = bits.view(b, scale.length, m.cfg.d_vae).to(torch.uint8)
            else:
                bits = forced_bits[:, scale.start : scale.end].to(self.device, torch.uint8)
            loop.record(scale, bits)
            codes = vae.lfq.bits_to_codes(self._bits_to_vae_grid(bits, scale.h, scale.w))
            if scale.is_last:
                summed = codes if summed is None else summed + codes
                break
            up = upsample_codes(codes, vae_sizes[-1])
            summed = up if summed is None else summed + up
            x = m.word_embed(self._next_input(summed, vae_sizes[scale.index + 1]).to(m.word_embed.weight.dtype))
            x = x.repeat(cond.rows // b, 1, 1)
        loop.finish()
        images = vae.decode(summed).add(1).div(2)
        return loop.result(images, summed, kept if keep_logits else None)

    def _bits_to_vae_grid(self, bits: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Token-grid bits (B, h*w, d_vae) -> VAE-grid bits (B, H, W, bits); pixel-shuffled when patchified."""
        grid = bits.view(bits.shape[0], h, w, -1)
        if self.model.cfg.patchify:
            grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return grid

    def _next_input(self, summed: torch.Tensor, vae_size: tuple[int, int]) -> torch.Tensor:
        """Trilinear resize of the code sum to the next scale, as tokens (B, h*w, d_vae)."""
        nxt = upsample_codes(summed, vae_size)
        if self.model.cfg.patchify:
            nxt = F.pixel_unshuffle(nxt, 2)
        return nxt.flatten(2).transpose(1, 2)

    def teacher_inputs(self, bits: list[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - 1, d_vae) from per-scale bits (B, h*w, d_vae), built with the
        inference rule (trilinear up/down of the running code sum). The last scale's bits, if given, are unused."""
        n = len(schedule.sizes)
        if len(bits) not in (n - 1, n):
            raise ValueError(f"{len(bits)} scales of bits for a schedule of {n} scales; expected {n - 1} or {n}")
        vae_sizes = schedule.vae_sizes(self.model.cfg.patchify)
        summed, out = None, []
        for scale, b in zip(schedule.scales[:-1], bits[: n - 1], strict=True):
            codes = self.vae.lfq.bits_to_codes(self._bits_to_vae_grid(b, scale.h, scale.w))
            up = upsample_codes(codes, vae_sizes[-1])
            summed = up if summed is None else summed + up
            out.append(self._next_input(summed, vae_sizes[scale.index + 1]))
        return torch.cat(out, dim=1)


def check_size(size) -> tuple[int, int]:
    """``size`` for :meth:`InfinityPipeline.generate`: a (height, width) pair of integers in pixels. Text such as
    ``"256x256"`` is refused (the command line's WIDTHxHEIGHT text goes through
    :func:`scalekv.schedules.parse_size`)."""
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in size):
        hint = "; for 'WIDTHxHEIGHT' text use scalekv.schedules.parse_size" if isinstance(size, str) else ""
        raise ValueError(f"size={size!r}: expected (height, width) in pixels, e.g. (1024, 1024){hint}")
    return int(size[0]), int(size[1])


def to_official_uint8(images: torch.Tensor) -> torch.Tensor:
    """What the reference returns for RGB ``images`` (B, 3, H, W) in [0, 1]: (B, H, W, 3) uint8, truncated, BGR."""
    return images.permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))


def infinity_names() -> list[str]:
    return ["infinity", *sorted(INFINITY_PRESETS)]


def read_custom_config(folder: Path) -> tuple[InfinityConfig, BSQVAEConfig]:
    """Architecture of a non-preset model: ``folder/config.json`` = ``{"infinity": {...}, "vae": {...}}`` with
    :class:`InfinityConfig` and :class:`BSQVAEConfig` fields."""
    from .checkpoint import read_json

    path = folder / CUSTOM_CONFIG
    if not path.is_file():
        raise CheckpointError(f"model 'infinity' needs {str(path)!r} describing the architecture")
    raw = read_json(path, "model config")
    if set(raw) != {"infinity", "vae"}:
        raise CheckpointError(f"{str(path)!r}: expected exactly the keys 'infinity' and 'vae', got {sorted(raw)}")
    try:
        vae = raw["vae"]
        vae_cfg = BSQVAEConfig(**{**vae, "ch_mult": tuple(vae["ch_mult"])} if "ch_mult" in vae else vae)
        return InfinityConfig(**raw["infinity"]), vae_cfg
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None


def write_custom_config(folder: Path, cfg: InfinityConfig, vae_cfg: BSQVAEConfig) -> None:
    vae = {k: v for k, v in vae_cfg.__dict__.items() if k != "with_encoder"}
    from .atomic import atomic_write_text

    atomic_write_text(folder / CUSTOM_CONFIG, json.dumps({"infinity": cfg.to_json(), "vae": vae}, indent=1))


def _find(folder: Path, names: list[str]) -> Path:
    if not folder.is_dir():
        raise CheckpointError(f"weights folder {str(folder)!r} does not exist or is not a folder")
    for name in names:
        p = folder / name
        if p.is_file() or (p.is_dir() and (any(p.glob("*.safetensors")))):
            return p
    raise CheckpointError(f"none of {names} (a file, or a folder of safetensors shards) found in {str(folder)!r}")


def random_infinity_pipeline(cfg: InfinityConfig, vae_cfg: BSQVAEConfig, seed: int = 0) -> InfinityPipeline:
    """A randomly initialised pipeline (tests and memory/speed benchmarks, where weights do not matter)."""
    torch.manual_seed(seed)
    return InfinityPipeline(Infinity(cfg), BSQVAE(vae_cfg))
