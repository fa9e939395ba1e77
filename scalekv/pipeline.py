"""Class-conditional generation with VAR + its VQVAE, against any cache policy."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache.base import KVCache
from .checkpoint import CheckpointError
from .generation import Generation, GenerationLoop, check_sampling, make_generators
from .models.var import VAR, VAR_PRESETS, VARConfig, load_var
from .models.vqvae import VQVAE, VQVAE_PRESETS, VQVAEConfig, load_vqvae
from .sampling import sample_top_k_top_p


def _check_labels(labels, num_classes: int) -> torch.Tensor:
    expected = f"labels {labels!r}: expected a non-empty 1-D sequence of integer class ids, e.g. [207, 360]"
    if labels is None or isinstance(labels, (str, bytes)):
        raise ValueError(expected)
    if isinstance(labels, (list, tuple)) and any(isinstance(x, (str, bytes)) for x in labels):
        raise ValueError(expected)
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(expected) from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.ndim != 1 or t.numel() == 0:
        raise ValueError(expected)
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise ValueError(f"labels {bad.tolist()} out of range: expected class ids in [0, {num_classes - 1}]")
    return t.long()


class VARPipeline:
    """A VAR transformer and its VQVAE, ready to generate images for class labels."""

    def __init__(self, model: VAR, vae: VQVAE) -> None:
        if tuple(model.cfg.patch_nums) != tuple(vae.cfg.patch_nums):
            raise ValueError(f"VAR patch_nums {model.cfg.patch_nums} != VQVAE patch_nums {vae.cfg.patch_nums}")
        if (model.cfg.vocab_size, model.cfg.z_channels) != (vae.cfg.vocab_size, vae.cfg.z_channels):
            raise ValueError("VAR and VQVAE disagree on vocabulary size or code channels")
        self.model, self.vae = model.eval(), vae.eval()

    @property
    def device(self) -> torch.device:
        return self.model.pos_start.device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> VARPipeline:
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        return self

    @classmethod
    def from_pretrained(
        cls, name: str, weights: str | Path | None = None, *, var_file: str | None = None, vae_file: str | None = None
    ) -> VARPipeline:
        """Load a preset by name. ``weights`` is a folder with the official files (``var_d16.pth`` and
        ``vae_ch160v4096z32.pth``); ``var_file``/``vae_file`` name the files directly instead."""
        if name not in VAR_PRESETS:
            raise ValueError(f"unknown VAR model {name!r}: expected one of {sorted(VAR_PRESETS)}")
        cfg = VAR_PRESETS[name]
        vae_cfg = VQVAE_PRESETS["vae_ch160v4096z32" if cfg.patch_nums[-1] == 16 else "vae_ch160v4096z32_512"]
        folder = Path(weights) if weights is not None else None
        if folder is not None and not folder.is_dir():
            raise CheckpointError(f"weights folder {str(folder)!r} does not exist or is not a folder")
        var_path = (
            Path(var_file) if var_file else _find(folder, [f"var_d{cfg.depth}.pth", f"var_d{cfg.depth}.safetensors"])
        )
        vae_path = (
            Path(vae_file) if vae_file else _find(folder, ["vae_ch160v4096z32.pth", "vae_ch160v4096z32.safetensors"])
        )
        vae_cfg = VQVAEConfig(**{**vae_cfg.__dict__, "with_encoder": False})
        return cls(load_var(str(var_path), cfg), load_vqvae(str(vae_path), vae_cfg))

    @torch.no_grad()
    def generate(
        self,
        labels,
        *,
        cache: KVCache | None = None,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int | list[int] | None = 0,
        greedy: bool = False,
        keep_logits: bool = False,
        seeding: str = "image",
    ) -> Generation:
        """Generate one image per class label.

        Classifier-free guidance as the official VAR: rows ``[labels; null]``, guided logits
        ``(1 + t) * cond - t * uncond`` with ``t = cfg * k / (n - 1)`` at scale ``k`` of ``n``. Sampling is top-k/top-p
        on the model's device; ``greedy`` takes the argmax. ``seeding="image"`` (the default) gives image ``i`` its own
        generator, seeded ``seed + i`` (or ``seed[i]`` for a list of one seed per label), so an image never depends on
        its batch; ``seeding="batch"`` draws the whole batch from one generator seeded ``seed``, as the official VAR.
        ``cache`` defaults to the full cache; it is reset here, so one object may serve many generations.
        """
        m, vae = self.model, self.vae
        labels = _check_labels(labels, m.cfg.num_classes).to(self.device)
        check_sampling(cfg, top_k, top_p)
        loop = GenerationLoop(cache)
        b, scales = labels.shape[0], m.cfg.scales
        gen = make_generators(seed, b, self.device, seeding)  # validates the seeds even when greedy ignores them
        gen = None if greedy else gen

        loop.begin(m.cache_layout(rows=2 * b, cond_rows=b))
        cond = m.class_emb(torch.cat((labels, torch.full_like(labels, m.cfg.num_classes))))
        block_cond = m.block_condition(cond)
        lvl_pos = m.level_pos()
        x = m.first_tokens(cond, lvl_pos)
        full = m.cfg.patch_nums[-1]
        f_hat = cond.new_zeros(b, m.cfg.z_channels, full, full, dtype=torch.float32)
        kept = []
        for scale in scales:
            logits = m.step(x, cond, block_cond, loop.cache, scale)
            t = cfg * scale.index / (len(scales) - 1)
            guided = (1 + t) * logits[:b] - t * logits[b:]
            if keep_logits:
                kept.append(guided.clone())
            idx = (
                guided.argmax(dim=-1) if greedy else sample_top_k_top_p(guided, top_k=top_k, top_p=top_p, generator=gen)
            )
            loop.record(scale, idx)
            f_hat, nxt = vae.quantize.next_input(scale.index, f_hat, idx)
            if nxt is not None:
                nxt_scale = scales[scale.index + 1]
                x = m.word_embed(nxt.to(m.word_embed.weight.dtype)) + lvl_pos[:, nxt_scale.start : nxt_scale.end]
                x = x.repeat(2, 1, 1)
        loop.finish()
        images = vae.decode(f_hat).add_(1).mul_(0.5)
        return loop.result(images, f_hat, kept if keep_logits else None)


def _find(folder: Path | None, names: list[str]) -> Path:
    if folder is None:
        raise CheckpointError(f"no weights given: pass a folder holding one of {names} or the file itself")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"none of {names} found in {str(folder)!r}")


def random_pipeline(var_cfg: VARConfig, vae_cfg: VQVAEConfig, seed: int = 0) -> VARPipeline:
    """A randomly initialised pipeline (for tests and memory/speed benchmarks, where weights do not matter)."""
    torch.manual_seed(seed)
    return VARPipeline(VAR(var_cfg), VQVAE(vae_cfg))
