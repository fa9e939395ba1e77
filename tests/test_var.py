"""Behaviour of the VAR model, its generation loop and its loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalekv.cache import KVCache
from scalekv.cache.store import CHUNK_TOKENS
from scalekv.checkpoint import CheckpointError, load_strict, save_state_file
from scalekv.models import VAR, VAR_PRESETS, VQVAE, VQVAE_PRESETS, VQVAEConfig, load_var
from scalekv.pipeline import VARPipeline

from .helpers import tiny_pipeline, tiny_var_config

MANIFEST = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "var_tiny" / "official_state_dict_manifest.json"
)


def test_cached_generation_equals_uncached_forward():
    """Guided logits of the KV-cached loop equal teacher forcing over the generated tokens."""
    pipe = tiny_pipeline()
    labels = torch.tensor([3, 7])
    gen = pipe.generate(labels, cfg=2.0, greedy=True, keep_logits=True)
    per_scale = [s.tokens for s in gen.scales]
    x = pipe.vae.quantize.teacher_inputs(per_scale)
    with torch.no_grad():
        cond = pipe.model(labels, x)
        uncond = pipe.model(torch.full_like(labels, pipe.model.cfg.num_classes), x)
    n = len(gen.scales)
    for s, rec, guided in zip(pipe.model.cfg.scales, gen.scales, gen.logits, strict=True):
        t = 2.0 * s.index / (n - 1)
        expect = (1 + t) * cond[:, s.start : s.end] - t * uncond[:, s.start : s.end]
        torch.testing.assert_close(guided, expect, atol=2e-5, rtol=1e-5)
        assert torch.equal(rec.tokens, guided.argmax(-1))


def test_same_seed_same_images_and_different_seed_differs():
    pipe = tiny_pipeline()
    a = pipe.generate([1, 2], seed=5, top_k=20, top_p=0.9)
    b = pipe.generate([1, 2], seed=5, top_k=20, top_p=0.9)
    c = pipe.generate([1, 2], seed=6, top_k=20, top_p=0.9)
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_greedy_batch_row_equals_sample_alone():
    pipe = tiny_pipeline()
    labels = [4, 0, 9]
    batch = pipe.generate(labels, greedy=True, cfg=1.5)
    for i, label in enumerate(labels):
        alone = pipe.generate([label], greedy=True, cfg=1.5)
        assert torch.equal(batch.tokens[i : i + 1], alone.tokens)
        torch.testing.assert_close(batch.images[i : i + 1], alone.images, atol=1e-5, rtol=0)


def test_generation_record_and_full_cache_accounting():
    pipe = tiny_pipeline()
    cfg = pipe.model.cfg
    gen = pipe.generate([1, 2], greedy=True)
    assert gen.images.shape == (2, 3, 12, 12) and gen.images.min() >= 0 and gen.images.max() <= 1
    assert [(r.h, r.w) for r in gen.scales] == [(p, p) for p in cfg.patch_nums]
    for rec, scale in zip(gen.scales, cfg.scales, strict=True):
        assert rec.tokens.shape == (2, scale.length)
        assert rec.cache_lengths == [0 if scale.is_last else scale.end] * cfg.depth  # the last map is never stored
    per_token = 2 * 4 * cfg.embed_dim * 4  # K and V, 4 rows = 2 labels x CFG, float32
    prefix, last = cfg.scales[-1].start, cfg.scales[-1].length
    assert gen.kv_bytes_reference == cfg.depth * cfg.seq_len * per_token
    assert gen.kv_bytes_history == cfg.depth * prefix * per_token == gen.scales[-2].kv_bytes
    # every layer's history, plus one layer's last map attended over in place, plus one copy chunk of K or V
    chunk = min(CHUNK_TOKENS, cfg.depth * prefix + last) * per_token // 2
    assert gen.kv_bytes_peak == (cfg.depth * prefix + last) * per_token + chunk < gen.kv_bytes_reference


def test_cache_object_is_reset_between_generations():
    pipe = tiny_pipeline()
    cache = KVCache()
    a = pipe.generate([5], seed=1, cache=cache)
    b = pipe.generate([5], seed=1, cache=cache)
    assert torch.equal(a.images, b.images)
    assert a.kv_bytes_peak == b.kv_bytes_peak


@pytest.mark.parametrize(
    "labels, message",
    [([10], "out of range"), ([-1], "out of range"), ([1.5], "integer class ids"), ([], "non-empty")],
)
def test_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline().generate(labels)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cfg=float("nan")), "cfg=nan"),
        (dict(cfg=-1.0), "cfg=-1.0"),
        (dict(top_k=-3), "top_k=-3"),
        (dict(top_p=1.5), "top_p=1.5"),
    ],
)
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline().generate([1], **kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        VARPipeline.from_pretrained("var-d16", tmp_path / "missing")
    with pytest.raises(CheckpointError, match="var_d16.pth"):
        VARPipeline.from_pretrained("var-d16", tmp_path)
    with pytest.raises(ValueError, match="unknown VAR model 'var-d99'"):
        VARPipeline.from_pretrained("var-d99", tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_var(str(tmp_path / "nope.pth"), tiny_var_config())


def test_wrong_checkpoint_lists_every_problem(tmp_path):
    small = VAR(tiny_var_config())
    state = small.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    path = tmp_path / "var.safetensors"
    save_state_file(state, path)
    other = tiny_var_config(num_classes=20)
    with pytest.raises(CheckpointError) as err:
        load_var(str(path), other)
    text = str(err.value)
    assert "missing (1): head.bias" in text
    assert "unexpected (1): extra.weight" in text
    assert "mis-shaped (checkpoint != model) (1): class_emb.weight (11, 64) != (21, 64)" in text


def test_pth_and_safetensors_round_trip(tmp_path):
    pipe = tiny_pipeline(seed=3)
    torch.save(pipe.model.state_dict(), tmp_path / "m.pth")
    save_state_file(pipe.model.state_dict(), tmp_path / "m.safetensors")
    ref = pipe.generate([2], greedy=True).images
    for name in ("m.pth", "m.safetensors"):
        model = load_var(str(tmp_path / name), pipe.model.cfg)
        again = VARPipeline(model, pipe.vae).generate([2], greedy=True).images
        assert torch.equal(ref, again)


@pytest.mark.skipif(not MANIFEST.is_file(), reason="official manifest fixture not present")
@pytest.mark.parametrize("preset, key", [(p, "var_" + p.split("-")[1]) for p in VAR_PRESETS])
def test_presets_match_official_state_dict_keys(preset, key):
    """Every preset has exactly the official key set and shapes (built on the meta device)."""
    manifest = json.loads(MANIFEST.read_text())
    key = key if key in manifest else "var_d36_s_512px"
    with torch.device("meta"):
        model = VAR(VAR_PRESETS[preset])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: s for k, s, _ in manifest[key]["entries"]}
    assert ours == theirs
    dtypes = {k: d for k, _, d in manifest[key]["entries"]}
    assert dtypes["lvl_1L"] == "int64" and model.lvl_1L.dtype == torch.int64


@pytest.mark.skipif(not MANIFEST.is_file(), reason="official manifest fixture not present")
def test_vqvae_matches_official_state_dict_keys():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        vae = VQVAE(VQVAE_PRESETS["vae_ch160v4096z32"])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == {k: s for k, s, _ in manifest["vae_ch160v4096z32"]["entries"]}
    # a decode-only model accepts the full official key set only by explicitly ignoring the encoder side
    with torch.device("meta"):
        dec = VQVAE(VQVAEConfig(with_encoder=False))
    state = {k: torch.empty(s, device="meta") for k, s, _ in manifest["vae_ch160v4096z32"]["entries"]}
    with pytest.raises(CheckpointError, match="unexpected"):
        load_strict(dec, state, what="decode-only VQVAE")


def test_tokenizer_round_trip_and_teacher_inputs():
    pipe = tiny_pipeline()
    img = torch.rand(2, 3, 12, 12) * 2 - 1
    with torch.no_grad():
        f = pipe.vae.encode(img)
        idx, f_hat = pipe.vae.quantize.quantize(f)
        assert [i.shape for i in idx] == [(2, p * p) for p in pipe.model.cfg.patch_nums]
        torch.testing.assert_close(pipe.vae.decode(f_hat), pipe.vae.idx_to_img(idx))
        x = pipe.vae.quantize.teacher_inputs(idx)
    assert x.shape == (2, pipe.model.cfg.seq_len - 1, pipe.model.cfg.z_channels)
