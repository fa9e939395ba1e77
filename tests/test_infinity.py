"""Behaviour of Infinity, its BSQ-VAE, schedules, loaders, text encoder and CLI (tiny random models, CPU)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scalekv.cache import KVCache
from scalekv.checkpoint import CheckpointError, save_state_file
from scalekv.infinity_pipeline import InfinityPipeline, random_infinity_pipeline, write_custom_config
from scalekv.models.bsq_vae import BSQVAE, BSQVAEConfig, load_bsq_vae
from scalekv.models.infinity import (
    CrossAttention,
    Infinity,
    InfinityConfig,
    TextBatch,
    apply_rope,
    load_infinity,
    rope_positions,
    rope_table,
)
from scalekv.schedules import (
    PIXEL_NAMES,
    TEMPLATES,
    ScaleSchedule,
    get_schedule,
    parse_size,
    schedule_for_size,
)

TINY_SCHEDULE = ScaleSchedule(1.0, "tiny", ((1, 1), (2, 2), (3, 3), (4, 4)), (64, 64))  # 64x64 pixels, 30 tokens


def tiny_config(**overrides) -> InfinityConfig:
    base = dict(
        depth=4,
        embed_dim=64,
        num_heads=2,
        mlp_ratio=4.0,
        text_channels=256,
        text_maxlen=24,
        block_chunks=2,
        d_vae=8,
        cross_attn_bf16=False,
    )
    base.update(overrides)
    return InfinityConfig(**base)


def tiny_vae_config(**overrides) -> BSQVAEConfig:
    base = dict(codebook_dim=8, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, patch_size=16)
    base.update(overrides)
    return BSQVAEConfig(**base)


def tiny_pipeline(seed: int = 0, vae_overrides: dict | None = None, **overrides) -> InfinityPipeline:
    return random_infinity_pipeline(tiny_config(**overrides), tiny_vae_config(**(vae_overrides or {})), seed=seed)


def random_text(lens: list[int], channels: int = 256, seed: int = 0) -> TextBatch:
    gen = torch.Generator().manual_seed(seed)
    return TextBatch(torch.randn(sum(lens), channels, generator=gen), torch.tensor(lens))


def official_state(model: Infinity) -> dict[str, torch.Tensor]:
    """Our weights under the official ``block_chunks.{c}.module.{j}`` names."""
    per = model.cfg.depth // model.cfg.block_chunks
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            layer, rest = k.split(".", 2)[1:]
            k = f"block_chunks.{int(layer) // per}.module.{int(layer) % per}.{rest}"
        out[k] = v.clone()
    return out


# -- schedules ------------------------------------------------------------------------------------------------
def test_every_template_has_its_aspect_and_pixel_counts():
    assert len(TEMPLATES) == 15
    for template in TEMPLATES:
        for pixels, n in PIXEL_NAMES.items():
            s = get_schedule(template, pixels)
            h, w = s.sizes[-1]
            assert len(s.sizes) == n and s.sizes[0] == (1, 1)
            assert abs(h / w - template) < 0.01, (template, pixels, s.sizes[-1])
            assert all(a <= c and b <= d for (a, b), (c, d) in zip(s.sizes, s.sizes[1:], strict=False))


def test_square_schedules_match_the_documented_token_counts():
    assert get_schedule(1.0, "1M").total_tokens == 10521
    assert get_schedule(1.0, "1M").scales[-1].start == 6425  # the prefix a budget fraction refers to
    assert get_schedule(1.0, "0.25M").total_tokens == 2521
    assert get_schedule(1.0, "0.06M").total_tokens == 521


def test_schedule_for_size_picks_the_nearest_template_and_pixel_count():
    assert schedule_for_size(1024, 1024) == get_schedule(1.0, "1M")
    assert schedule_for_size(512, 512) == get_schedule(1.0, "0.25M")
    assert schedule_for_size(256, 256) == get_schedule(1.0, "0.06M")
    wide = schedule_for_size(512, 1024)  # h/w = 0.5
    assert wide.template == 0.5 and wide.image_size[0] < wide.image_size[1]
    assert parse_size("1024x768") == (768, 1024)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")
    with pytest.raises(ValueError, match="height"):
        schedule_for_size(0, 1024)
    with pytest.raises(ValueError, match="template"):
        get_schedule(0.9, "1M")
    with pytest.raises(ValueError, match="pixel count"):
        get_schedule(1.0, "2M")


# -- RoPE -----------------------------------------------------------------------------------------------------
def test_rope_positions_lay_every_scale_on_the_1m_grid():
    pos = rope_positions(get_schedule(1.0, "0.06M"))
    assert pos.shape == (521, 2)
    assert pos[1:5].tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]  # the 2x2 map
    assert pos[:, 0].max() < 64 and pos[:, 1].max() < 64


def test_rope_is_a_rotation_and_depends_on_relative_position():
    table = rope_table(torch.tensor([[0, 0], [3, 5], [7, 9], [10, 14]]), head_dim=16, base=10000.0)
    x = torch.randn(1, 1, 4, 16)
    assert torch.allclose(apply_rope(x, table).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    q, k = torch.randn(16), torch.randn(16)
    # positions (0,0)->(3,5) and (7,9)->(10,14) have the same offset, so the same q.k after rotation
    rq = apply_rope(q.expand(4, 16).reshape(1, 1, 4, 16), table)[0, 0]
    rk = apply_rope(k.expand(4, 16).reshape(1, 1, 4, 16), table)[0, 0]
    assert torch.allclose(rq[0] @ rk[1], rq[2] @ rk[3], atol=1e-5)
    assert not torch.allclose(rq[0] @ rk[1], rq[0] @ rk[2], atol=1e-3)


# -- cross-attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True])
def test_varlen_cross_attention_equals_a_loop_over_samples(bf16):
    torch.manual_seed(0)
    ca = CrossAttention(32, 16, 4)
    for p in ca.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lens = torch.tensor([3, 1, 5])
    text, x = torch.randn(int(lens.sum()), 16), torch.randn(3, 7, 32)
    batched = ca(x, ca.text_kv(text, lens, bf16), bf16)
    starts = torch.cumsum(lens, 0) - lens
    for i in range(3):
        own = text[int(starts[i]) : int(starts[i]) + int(lens[i])]
        alone = ca(x[i : i + 1], ca.text_kv(own, lens[i : i + 1], bf16), bf16)
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-5)


def test_bf16_option_rounds_cross_attention_like_the_reference():
    torch.manual_seed(0)
    ca = CrossAttention(32, 16, 4)
    lens, text, x = torch.tensor([4]), torch.randn(4, 16), torch.randn(1, 5, 32)
    kv = ca.text_kv(text, lens, bf16=True)
    assert torch.equal(kv.k, kv.k.bfloat16().float()) and torch.equal(kv.v, kv.v.bfloat16().float())
    diff = (ca(x, kv, True) - ca(x, ca.text_kv(text, lens, False), False)).abs().max()
    assert 0 < diff < 0.05


# -- the model and its generation loop ------------------------------------------------------------------------
def test_cached_generation_equals_uncached_forward():
    """Guided logits of the KV-cached loop equal teacher forcing over the generated bits, cond and uncond."""
    pipe = tiny_pipeline()
    text = random_text([3, 6])
    gen = pipe.generate(text, schedule=TINY_SCHEDULE, cfg=2.5, tau=0.5, top_k=1, keep_logits=True)
    x = pipe.teacher_inputs([s.tokens for s in gen.scales], TINY_SCHEDULE)
    with torch.no_grad():
        cond = pipe.model(text, x, TINY_SCHEDULE) / 0.5
        uncond = pipe.model(TextBatch(pipe.model.uncond_text(text.lens), text.lens), x, TINY_SCHEDULE) / 0.5
    assert torch.allclose(torch.cat(gen.logits, dim=1), 2.5 * cond - 1.5 * uncond, atol=1e-4)
    assert gen.tokens.shape == (2, TINY_SCHEDULE.total_tokens, 8) and gen.tokens.dtype == torch.uint8
    assert gen.images.shape == (2, 3, 64, 64) and 0 <= gen.images.min() and gen.images.max() <= 1
    assert gen.f_hat.shape == (2, 8, 4, 4)


def test_top_k_1_is_greedy_and_seeds_reproduce():
    pipe, text = tiny_pipeline(), random_text([4])
    greedy = pipe.generate(text, schedule=TINY_SCHEDULE, top_k=1, keep_logits=True)
    pairs = torch.cat(greedy.logits, dim=1).unflatten(-1, (-1, 2))
    assert torch.equal(greedy.tokens.long(), pairs.argmax(-1))
    a = pipe.generate(text, schedule=TINY_SCHEDULE, tau=2.0, top_p=0.0, seed=1)
    b = pipe.generate(text, schedule=TINY_SCHEDULE, tau=2.0, top_p=0.0, seed=1)
    c = pipe.generate(text, schedule=TINY_SCHEDULE, tau=2.0, top_p=0.0, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_batch_of_prompts_equals_each_prompt_alone():
    pipe, text = tiny_pipeline(), random_text([3, 7])
    both = pipe.generate(text, schedule=TINY_SCHEDULE, top_k=1)
    for i in range(2):
        alone = pipe.generate(text.select([i]), schedule=TINY_SCHEDULE, top_k=1)
        assert torch.equal(both.tokens[i : i + 1], alone.tokens)


def test_cfg_rows_and_negative_prompts():
    pipe, text = tiny_pipeline(), random_text([3, 5])
    cache = KVCache()
    pipe.generate(text, schedule=TINY_SCHEDULE, cfg=1.0, top_k=1, cache=cache)
    assert (cache.layout.rows, cache.layout.cond_rows) == (2, 2)  # cfg 1: no unconditional rows, as the reference
    pipe.generate(text, schedule=TINY_SCHEDULE, cfg=3.0, top_k=1, cache=cache)
    assert (cache.layout.rows, cache.layout.cond_rows) == (4, 2)
    plain = pipe.generate(text, schedule=TINY_SCHEDULE, top_k=1, keep_logits=True)
    neg = pipe.generate(
        text, schedule=TINY_SCHEDULE, top_k=1, keep_logits=True, negative_prompts=random_text([2, 2], seed=5)
    )
    assert not torch.allclose(plain.logits[0], neg.logits[0])
    with pytest.raises(ValueError, match="negative prompts"):
        pipe.generate(text, schedule=TINY_SCHEDULE, negative_prompts=random_text([2]))


def test_text_kv_is_computed_once_per_generation(monkeypatch):
    pipe, calls = tiny_pipeline(), []
    original = CrossAttention.text_kv

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CrossAttention, "text_kv", counting)
    pipe.generate(random_text([3]), schedule=TINY_SCHEDULE, top_k=1)
    assert len(calls) == pipe.model.cfg.depth + 1  # every block's cross-attention and the text pool, once each


def test_cache_sees_normalised_scaled_rotated_queries_and_keys():
    """The cache receives q/k after cos-normalisation, scale_mul and RoPE: |k| = 1, |q| = exp(scale_mul)."""
    seen = []

    class Spy(KVCache):
        def update(self, layer, scale, q, k, v):
            seen.append((layer, scale.index, q.clone(), k.clone()))
            return super().update(layer, scale, q, k, v)

    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.model.blocks[1].sa.scale_mul_1H11.copy_(torch.log(torch.tensor([2.0, 300.0])).view(1, 2, 1, 1))
    pipe.generate(random_text([3]), schedule=TINY_SCHEDULE, top_k=1, cache=Spy())
    assert len(seen) == 4 * len(TINY_SCHEDULE.sizes)
    for layer, _, q, k in seen:
        assert torch.allclose(k.norm(dim=-1), torch.ones(()), atol=1e-5)
        if layer == 1:
            assert torch.allclose(q.norm(dim=-1)[:, 0], torch.tensor(2.0), atol=1e-4)
            assert torch.allclose(q.norm(dim=-1)[:, 1], torch.tensor(100.0), atol=1e-2)  # clamped at 100


def test_patchified_model_runs_on_the_doubled_vae_grid():
    pipe = tiny_pipeline(
        d_vae=16, patchify=True, vae_overrides=dict(codebook_dim=4, ch_mult=(1, 1, 1, 1), patch_size=8)
    )
    text = random_text([3])
    gen = pipe.generate(text, schedule=TINY_SCHEDULE, top_k=1, keep_logits=True)
    assert gen.f_hat.shape == (1, 4, 8, 8) and gen.images.shape == (1, 3, 64, 64)
    x = pipe.teacher_inputs([s.tokens for s in gen.scales], TINY_SCHEDULE)
    with torch.no_grad():
        cond = pipe.model(text, x, TINY_SCHEDULE)
        uncond = pipe.model(TextBatch(pipe.model.uncond_text(text.lens), text.lens), x, TINY_SCHEDULE)
    assert torch.allclose(torch.cat(gen.logits, 1), (3 * cond - 2 * uncond) / 0.5, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    pipe, text = tiny_pipeline(), random_text([3])
    with pytest.raises(ValueError, match="tau"):
        pipe.generate(text, schedule=TINY_SCHEDULE, tau=0)
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate(text, schedule=TINY_SCHEDULE, top_p=2.0)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe.generate(["a cat"], schedule=TINY_SCHEDULE)
    with pytest.raises(ValueError, match="list of strings"):
        pipe.generate("a cat", schedule=TINY_SCHEDULE)
    with pytest.raises(ValueError, match="forced_bits"):
        pipe.generate(text, schedule=TINY_SCHEDULE, forced_bits=torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="channels"):
        pipe.generate(random_text([3], channels=128), schedule=TINY_SCHEDULE)
    with pytest.raises(ValueError, match="lens sum"):
        TextBatch(torch.zeros(4, 256), torch.tensor([3]))
    with pytest.raises(ValueError, match="at most"):
        pipe.generate(random_text([30]), schedule=TINY_SCHEDULE)
    with pytest.raises(ValueError, match="bits per VAE position"):
        InfinityPipeline(pipe.model, BSQVAE(tiny_vae_config(codebook_dim=4)))
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(block_chunks=3)


# -- BSQ-VAE --------------------------------------------------------------------------------------------------
def test_bsq_codes_and_multiscale_quantiser():
    vae = BSQVAE(tiny_vae_config())
    bits = torch.randint(0, 2, (2, 3, 3, 8))
    codes = vae.lfq.bits_to_codes(bits)
    assert codes.shape == (2, 8, 3, 3)
    assert torch.allclose(codes.abs(), torch.full((), 1 / math.sqrt(8)), atol=1e-7)
    assert torch.equal(codes > 0, bits.permute(0, 3, 1, 2).bool())
    z = torch.randn(2, 8, 4, 4)
    per_scale, recon = vae.quantize_multiscale(z, TINY_SCHEDULE.sizes)
    assert [tuple(b.shape[1:3]) for b in per_scale] == list(TINY_SCHEDULE.sizes)
    assert torch.equal(per_scale[0][:, 0, 0], (F.adaptive_avg_pool2d(z, 1)[:, :, 0, 0] > 0).to(torch.uint8))
    assert (recon - z).norm() < z.norm()  # the residual shrinks
    with pytest.raises(ValueError, match="last scale"):
        vae.quantize_multiscale(z, ((1, 1), (2, 2)))


def test_vae_encode_decode_shapes():
    vae = BSQVAE(tiny_vae_config())
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(img)
        out = vae.decode(z)
    assert z.shape == (1, 8, 2, 2) and out.shape == (1, 3, 32, 32) and out.abs().max() <= 1


# -- loading --------------------------------------------------------------------------------------------------
def test_official_chunked_pth_loads_strictly(tmp_path):
    model = Infinity(tiny_config())
    state = official_state(model)
    torch.save(state, tmp_path / "infinity.pth")
    loaded = load_infinity(tmp_path / "infinity.pth", tiny_config())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    missing = dict(state)
    del missing["block_chunks.1.module.0.sa.q_bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): blocks.2.sa.q_bias"):
        load_infinity(tmp_path / "missing.pth", tiny_config())
    torch.save({**state, "block_chunks.2.module.0.ada_gss": state["pos_start"]}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="chunk 2, slot 0 is outside 2 chunks"):
        load_infinity(tmp_path / "extra.pth", tiny_config())
    torch.save({**state, "blocks.0.ada_gss": state["block_chunks.0.module.0.ada_gss"]}, tmp_path / "twice.pth")
    with pytest.raises(CheckpointError, match="twice"):
        load_infinity(tmp_path / "twice.pth", tiny_config())


def test_sharded_safetensors_folder_loads(tmp_path):
    model = Infinity(tiny_config())
    state = official_state(model)
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in halves.items():
        save_state_file({k: state[k] for k in part}, tmp_path / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_infinity(tmp_path, tiny_config())
    assert torch.equal(loaded.blocks[3].ffn.fc2.weight, model.blocks[3].ffn.fc2.weight)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_state_file({keys[0]: state[keys[0]]}, tmp_path / "model-extra.safetensors")
    with pytest.raises(CheckpointError, match="repeats keys"):
        load_infinity(tmp_path, tiny_config())


@pytest.mark.parametrize("spelling", ["wrapped", "plain"])
def test_vae_loads_either_spelling_from_the_vae_entry(tmp_path, spelling):
    vae = BSQVAE(tiny_vae_config())
    state = {}
    for k, v in vae.state_dict().items():
        if spelling == "plain":
            k = k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
            k = k.replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")
        state[k] = v
    state["quantize.lfq.mask"] = state["quantizer.lfq.mask"]
    torch.save({"vae": state, "step": torch.tensor(3)}, tmp_path / "vae.pth")
    loaded = load_bsq_vae(str(tmp_path / "vae.pth"), tiny_vae_config())
    assert torch.equal(loaded.decoder.conv_in.conv.weight, vae.decoder.conv_in.conv.weight)
    decode_only = load_bsq_vae(str(tmp_path / "vae.pth"), tiny_vae_config(with_encoder=False))
    assert not hasattr(decode_only, "encoder")
    state["quantize.lfq.mask"] = state["quantizer.lfq.mask"].flip(0)
    torch.save({"vae": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="differs"):
        load_bsq_vae(str(tmp_path / "bad.pth"), tiny_vae_config())


# -- text encoder and CLI -------------------------------------------------------------------------------------
def make_t5_folder(folder, d_model: int = 256) -> None:
    """A tiny random T5 encoder and a word-level tokenizer, saved as a local folder."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "on", "the", "mat", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=len(words),
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    transformers.T5EncoderModel(cfg).save_pretrained(folder)


def test_t5_encoder_reads_a_local_folder(tmp_path):
    make_t5_folder(tmp_path / "t5")
    from scalekv.text import T5TextEncoder

    enc = T5TextEncoder(tmp_path / "t5", max_length=12)
    batch = enc(["a red cat", "the dog on the mat"])
    assert batch.lens.tolist() == [4, 6]  # words + </s>
    assert batch.features.shape == (10, 256) and batch.features.dtype == torch.float32
    alone = enc(["a red cat"])
    assert torch.allclose(alone.features, batch.features[:4], atol=1e-5)  # padding does not leak into features
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        T5TextEncoder(tmp_path / "missing")


def make_model_folder(root, config: bool = True) -> None:
    """A tiny random Infinity model loadable by the name ``infinity``: ``root/model`` (weights and, with ``config``,
    its config.json) and ``root/vae.pth``."""
    cfg, vae_cfg = tiny_config(cross_attn_bf16=True), tiny_vae_config()
    (root / "model").mkdir()
    torch.manual_seed(0)
    save_state_file(official_state(Infinity(cfg)), root / "model" / "model.safetensors")
    torch.save({"vae": BSQVAE(vae_cfg).state_dict()}, root / "vae.pth")
    if config:
        write_custom_config(root / "model", cfg, vae_cfg)


def test_generate_command_on_a_tiny_local_model(tmp_path):
    from scalekv.cli import main

    make_t5_folder(tmp_path / "t5")
    make_model_folder(tmp_path, config=False)
    with pytest.raises(CheckpointError, match="config.json"):
        InfinityPipeline.from_pretrained("infinity", tmp_path / "model", vae=tmp_path / "vae.pth")
    write_custom_config(tmp_path / "model", tiny_config(cross_attn_bf16=True), tiny_vae_config())
    args = [
        "generate",
        "--model",
        "infinity",
        "--weights",
        str(tmp_path / "model"),
        "--vae",
        str(tmp_path / "vae.pth"),
        "--t5",
        str(tmp_path / "t5"),
        "--prompt",
        "a red cat",
        "--prompt",
        "a dog",
        "--size",
        "256x256",
        "--top-k",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["size"] == "256x256" and stats["images"] == ["0000.png", "0001.png"]
    assert stats["kv_bytes_history"] < stats["kv_bytes_peak"] < stats["kv_bytes_reference"]
    assert len(stats["cache_lengths_per_scale"]) == 7 and stats["cache_lengths_per_scale"][-2] == [265] * 4
    assert stats["average_capacity"] == 265 and stats["compress_seconds"] == 0.0  # the full cache: the whole prefix
    assert main([*args[:-2], "--out", str(tmp_path / "bad"), "--labels", "3"]) == 2  # labels are for VAR
    # a compressing policy: the same KV and time fields as VAR's stats.json, from what the cache held
    assert main([*args[:-2], "--policy", "snapkv", "--budget", "0.2", "--out", str(tmp_path / "snap")]) == 0
    snap = json.loads((tmp_path / "snap" / "stats.json").read_text())
    assert snap["policy"] == "snapkv" and snap["budget"] == 0.2 and snap["average_capacity"] == round(0.2 * 265)
    assert snap["cache_lengths_per_scale"][-2] == [53] * 4  # B tokens per layer carried into the last scale
    assert [sum(b) for b in snap["kv_bytes_per_scale_and_layer"]][-2] == snap["kv_bytes_history"]
    assert snap["kv_bytes_history"] < snap["kv_bytes_peak"] < stats["kv_bytes_peak"]
    assert snap["kv_bytes_reference"] == stats["kv_bytes_reference"]
    assert snap["kv_peak_ratio"] == snap["kv_bytes_peak"] / snap["kv_bytes_reference"]
    assert snap["compress_seconds"] > 0


def _lpips_installed() -> bool:
    from scalekv.metrics import MissingExtra, load_lpips

    try:
        load_lpips("lpips-alex", torch.device("cpu"))
    except MissingExtra:
        return False
    return True


def test_eval_command_on_prompts_resumes_and_refuses_other_prompts(tmp_path, capsys, monkeypatch):
    """`scalekv eval` on a text-to-image model: the full cache and one policy on 3 prompts at 256x256."""
    from scalekv.cli import main
    from scalekv.evaluation.storage import RunFolder
    from scalekv.metrics import psnr_ssim

    make_t5_folder(tmp_path / "t5")
    make_model_folder(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n  the dog on the mat  \na dog\nthe red mat\n")  # 4 prompts, a blank line
    out = tmp_path / "run"
    argv = ["eval", "--model", "infinity", "--weights", str(tmp_path / "model"), "--vae", str(tmp_path / "vae.pth")]
    argv += ["--t5", str(tmp_path / "t5"), "--prompts", str(prompts), "--n", "3", "--batch-size", "2"]
    argv += ["--size", "256x256", "--policies", "snapkv", "--budgets", "0.2", "--fid", "false", "--no-progress"]
    argv += ["--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["policy"], r["budget"], r["n"]) for r in rows] == [("full", None, 3), ("snapkv", 0.2, 3)]
    full, snap = rows
    assert full["psnr"] is None and full["ssim"] is None  # the reference
    folder = RunFolder(out)
    images, reference = folder.load_images("snapkv_b0.2", [0, 1, 2]), folder.load_images("full", [0, 1, 2])
    assert images.shape == (3, 3, 256, 256)
    psnr, ssim = psnr_ssim(reference, images)
    assert snap["psnr"] == pytest.approx(float(psnr.mean())) and snap["ssim"] == pytest.approx(float(ssim.mean()))
    assert 0 < snap["ssim"] <= 1
    assert snap["lpips_kind"] == ("lpips-alex" if _lpips_installed() else None)  # LPIPS on by default
    assert (snap["lpips"] is not None) == _lpips_installed()
    # memory per image: snapkv keeps less than the full cache of the same reference size
    assert snap["kv_bytes_reference"] == full["kv_bytes_reference"] > 0
    assert snap["kv_bytes_history"] < full["kv_bytes_history"] and snap["kv_bytes_peak"] < full["kv_bytes_peak"]
    for r in rows:
        assert r["kv_history_ratio"] == pytest.approx(r["kv_bytes_history"] / r["kv_bytes_reference"])
        assert r["kv_peak_ratio"] == pytest.approx(r["kv_bytes_peak"] / r["kv_bytes_reference"])
    table = (out / "metrics.md").read_text()
    assert "| snapkv | 20% |" in table and "FID ↓" in table and "PSNR (dB) ↑" in table
    recorded = json.loads((out / "config.json").read_text())
    assert (recorded["cfg"], recorded["tau"], recorded["top_k"], recorded["top_p"]) == (3.0, 0.5, 900, 0.97)
    assert recorded["size"] == "256x256" and "prompts" not in recorded and len(recorded["prompts_sha1"]) == 40
    capsys.readouterr()

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished run was generated again")

    monkeypatch.setattr(InfinityPipeline, "generate", no_generation)
    moved = tmp_path / "moved.txt"
    moved.write_text(prompts.read_text() + "\n\n")  # the same prompts elsewhere (and more blank lines)
    assert main([*argv[:-2], "--prompts", str(moved), "--out", str(out)]) == 0  # resumes: nothing left to do
    assert json.loads((out / "metrics.json").read_text())[1]["psnr"] == snap["psnr"]
    prompts.write_text("a red cat\nthe dog on the mat\nthe red mat\n")  # prompt 2 changed
    assert main(argv) == 2
    assert "prompts_sha1" in capsys.readouterr().err


def test_eval_on_prompts_refuses_bad_inputs_before_loading(tmp_path, capsys, monkeypatch):
    import scalekv.hub
    from scalekv.cli import main
    from scalekv.evaluation import EvalConfig

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scalekv.hub, "load_pipeline", no_loading)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    config = EvalConfig(model="infinity-2b", out=str(tmp_path / "a"), prompts=str(prompts), n=2)
    assert (config.cfg, config.tau, config.top_k, config.top_p, config.size) == (3.0, 0.5, 900, 0.97, "1024x1024")
    assert config.prompt_list() == ["a cat", "a dog"] and config.schedule().image_size == (1024, 1024)

    base = ["eval", "--model", "infinity-2b", "--weights", str(tmp_path), "--vae", "v.pth", "--t5", "t5"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt' does not exist"),
        (["--prompts", str(empty)], "holds no prompts"),
        (["--prompts", str(prompts), "--n", "3"], "n=3 but prompts file .* holds 2 prompts: expected n <= 2"),
        ([], "expected a prompts file"),
        (["--prompts", str(prompts), "--n", "2", "--size", "big"], "size 'big': expected WIDTHxHEIGHT"),
        (["--prompts", str(prompts), "--n", "2", "--tau", "0"], "tau=0.0: expected a positive temperature"),
    ]
    for extra, message in cases:
        assert main([*base, *extra, "--out", str(tmp_path / "out")]) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert main(["eval", "--model", "var-d16", "--prompts", str(prompts), "--out", str(tmp_path / "v")]) == 2
    assert "prompts given for 'var-d16': expected them only for the text-to-image models" in capsys.readouterr().err
    no_t5 = [a for a in base if a not in ("--t5", "t5")]
    no_t5 += ["--prompts", str(prompts), "--n", "2", "--policies", "snapkv", "--fid", "false"]
    assert main([*no_t5, "--out", str(tmp_path / "o")]) == 2
    assert "expected t5 (--t5 FOLDER" in capsys.readouterr().err


def test_core_package_imports_without_transformers(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import scalekv, scalekv.hub, scalekv.cli, scalekv.infinity_pipeline, scalekv.text\n"
        "try:\n"
        f"    scalekv.text.T5TextEncoder({str(tmp_path)!r})\n"
        "except ImportError as e:\n"
        "    print('clear:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clear: T5 text encoding needs transformers" in out.stdout


def test_hub_names_and_missing_files(tmp_path):
    from scalekv.hub import load_pipeline, model_names

    assert {"infinity", "infinity-2b", "infinity-8b"} <= set(model_names())
    with pytest.raises(CheckpointError, match="no VAE file"):
        load_pipeline("infinity-2b", str(tmp_path))
    with pytest.raises(CheckpointError, match="infinity_2b_reg.pth"):
        load_pipeline("infinity-2b", str(tmp_path), vae=str(tmp_path / "vae.pth"))
    with pytest.raises(ValueError, match="float32"):
        tiny_pipeline().to("cpu", torch.bfloat16)
