"""The training loop on tiny configs and fake data: data loading, straight-through VQ, resumability, export."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import pytest
import torch

from scalekv.cli import main
from scalekv.data import DatasetMissingError, load_fashion_mnist, load_images
from scalekv.hub import load_pipeline
from scalekv.models import VQVAE
from scalekv.training.common import OptimConfig, batch_indices
from scalekv.training.presets import TOKENIZER_OPTIM, TOKENIZER_PRESETS, VAR_OPTIM, VAR_TRAIN_PRESETS
from scalekv.training.tokenizer import quantize_train, train_tokenizer
from scalekv.training.transformer import export_demo, load_var_run, train_var


def write_idx(path, array: torch.Tensor) -> None:
    """An idx file as the Fashion-MNIST distribution ships it: magic, big-endian dims, uint8 data, gzip'd."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.numpy().tobytes())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("t10k", 20)):
        write_idx(
            root / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        )
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8))
    return root


def test_idx_files_are_read_and_resized(fake_root):
    raw, labels = load_fashion_mnist("train", fake_root)
    assert raw.shape == (48, 28, 28) and raw.dtype == torch.uint8 and labels.shape == (48,)
    with gzip.open(fake_root / "train-images-idx3-ubyte.gz") as fh:
        first = fh.read()[16 : 16 + 28 * 28]
    assert raw[0].flatten().tolist() == list(first)
    images, _ = load_images("test", 12, fake_root)
    assert images.shape == (20, 1, 12, 12) and images.min() >= -1 and images.max() <= 1


def test_missing_data_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetMissingError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split 'val'"):
        load_fashion_mnist("val", tmp_path)


def test_straight_through_quantisation_trains_encoder_codebook_and_phi():
    torch.manual_seed(0)
    vae = VQVAE(TOKENIZER_PRESETS["tiny"])
    f = vae.encode(torch.randn(3, 1, 12, 12))
    out = quantize_train(vae.quantize, f)
    _, f_hat = vae.quantize.quantize(f)
    torch.testing.assert_close(out.f_hat, f_hat, atol=1e-5, rtol=1e-5)  # forward value is the quantised latent
    (out.f_hat.square().sum() + out.vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert int(out.hits.sum()) == 3 * sum(p * p for p in vae.cfg.patch_nums)


def test_lr_schedule_and_batches():
    cfg = OptimConfig(steps=100, batch_size=4, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(99) < cfg.lr_at(50) < cfg.lr_at(10) and cfg.lr_at(100) == pytest.approx(0.1)
    epoch = torch.cat([batch_indices(12, 4, s, seed=3) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))  # one epoch visits every example once
    assert not torch.equal(batch_indices(12, 4, 0, seed=3), batch_indices(12, 4, 3, seed=3))
    with pytest.raises(ValueError, match="batch_size 13"):
        batch_indices(12, 13, 0, seed=0)


def _images(fake_root):
    return load_images("train", TOKENIZER_PRESETS["tiny"].image_size, fake_root)


def test_tokenizer_resume_reproduces_an_uninterrupted_run(fake_root, tmp_path):
    images, _ = _images(fake_root)
    cfg, opt = TOKENIZER_PRESETS["tiny"], TOKENIZER_OPTIM["tiny"]
    straight = train_tokenizer(cfg, opt, images, tmp_path / "a", save_every=2, restart_every=2, progress=False)
    train_tokenizer(cfg, replace(opt, steps=2), images, tmp_path / "b", save_every=2, restart_every=2, progress=False)
    resumed = train_tokenizer(cfg, opt, images, tmp_path / "b", save_every=2, restart_every=2, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert "step 4" in (tmp_path / "a" / "train.log").read_text()
    with pytest.raises(ValueError, match="different config"):
        train_tokenizer(cfg, replace(opt, lr=0.5), images, tmp_path / "a", progress=False)


@pytest.fixture(scope="module")
def trained_tiny(fake_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    images, labels = _images(fake_root)
    vae = train_tokenizer(TOKENIZER_PRESETS["tiny"], TOKENIZER_OPTIM["tiny"], images, root / "tok", progress=False)
    train_var(VAR_TRAIN_PRESETS["tiny"], VAR_OPTIM["tiny"], vae, images, labels, root / "var", progress=False)
    return root


def test_var_resume_reproduces_an_uninterrupted_run(fake_root, trained_tiny, tmp_path):
    from scalekv.training.transformer import load_tokenizer_run

    images, labels = _images(fake_root)
    vae = load_tokenizer_run(trained_tiny / "tok")
    cfg, opt = VAR_TRAIN_PRESETS["tiny"], VAR_OPTIM["tiny"]
    train_var(cfg, replace(opt, steps=1), vae, images, labels, tmp_path / "v", save_every=1, progress=False)
    resumed = train_var(cfg, opt, vae, images, labels, tmp_path / "v", save_every=1, progress=False)
    straight = load_var_run(trained_tiny / "var")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="cond_drop"):
        train_var(cfg, opt, vae, images, labels, tmp_path / "w", cond_drop=1.0, progress=False)


def test_var_training_lowers_the_loss(fake_root, tmp_path):
    from scalekv.training.transformer import load_tokenizer_run, var_loss

    images, labels = _images(fake_root)
    vae = train_tokenizer(TOKENIZER_PRESETS["tiny"], TOKENIZER_OPTIM["tiny"], images, tmp_path / "t", progress=False)
    vae = load_tokenizer_run(tmp_path / "t")
    cfg = VAR_TRAIN_PRESETS["tiny"]
    opt = OptimConfig(steps=30, batch_size=48, lr=3e-3, warmup=1)
    from scalekv.training.transformer import tokenize

    tokens = tokenize(vae, images)
    before = train_var(cfg, replace(opt, steps=1, lr=1e-9), vae, images, labels, tmp_path / "v0", progress=False)
    after = train_var(cfg, opt, vae, images, labels, tmp_path / "v1", cond_drop=0.0, progress=False)
    with torch.no_grad():
        assert var_loss(after, vae, tokens, labels) < var_loss(before, vae, tokens, labels) - 0.1


def test_export_loads_by_name_and_generates_what_the_run_generates(trained_tiny, tmp_path):
    from scalekv.pipeline import VARPipeline
    from scalekv.training.transformer import load_tokenizer_run

    paths = export_demo(trained_tiny / "tok", trained_tiny / "var", tmp_path / "demo")
    assert all(p.is_file() for p in paths)
    pipe = load_pipeline("demo", str(tmp_path / "demo"))
    direct = VARPipeline(load_var_run(trained_tiny / "var"), load_tokenizer_run(trained_tiny / "tok"))
    a = pipe.generate([1, 2, 3], seed=5, cfg=2.0)
    b = direct.generate([1, 2, 3], seed=5, cfg=2.0)
    torch.testing.assert_close(a.images, b.images)
    assert a.images.shape == (3, 3, 12, 12)
    with pytest.raises(ValueError, match="incomplete"):
        load_pipeline("demo", str(tmp_path))


def test_training_continues_from_an_exported_folder(fake_root, trained_tiny, tmp_path, capsys):
    """An export keeps the tokenizer's encoder, so `train var --from-export` restarts from the exported weights
    (a fresh optimiser) with no run folder; a decode-only export is refused by name."""
    from scalekv.training.transformer import exported_training, load_export

    export_demo(trained_tiny / "tok", trained_tiny / "var", tmp_path / "demo")
    vae, var = load_export(tmp_path / "demo")
    first = exported_training(tmp_path / "demo")
    images, labels = _images(fake_root)
    assert vae.cfg.with_encoder and len(vae.img_to_idx(images[:2])) == len(vae.cfg.patch_nums)
    tiny_opt = OptimConfig(steps=1, batch_size=8, lr=1e-12, warmup=1)
    cont = train_var(
        var.cfg, tiny_opt, vae, images, labels, tmp_path / "r", init=var, init_training=first, progress=False
    )
    fresh = train_var(var.cfg, tiny_opt, vae, images, labels, tmp_path / "f", progress=False)
    for (name, a), b in zip(cont.state_dict().items(), var.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # lr 1e-12: still the exported weights
    pairs = zip(var.state_dict().values(), fresh.state_dict().values(), strict=True)
    assert any(not torch.allclose(b, c) for b, c in pairs)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["init"] == "given weights"
    # the export can stand in for the tokenizer's run folder when exporting again (same tokenizer weights)
    export_demo(tmp_path / "demo", tmp_path / "r", tmp_path / "again")
    record = exported_training(tmp_path / "again")  # the warm restart's export counts the steps before it
    assert record["var_runs"] == [first["var_steps"], 1] and record["var_steps"] == first["var_steps"] + 1
    assert record["var_seconds"] >= first["var_seconds"]
    for a, b in zip(load_export(tmp_path / "again")[0].state_dict().values(), vae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)

    export_demo(trained_tiny / "tok", trained_tiny / "var", tmp_path / "dec", with_encoder=False)
    argv = ["train", "var", "--preset", "tiny", "--from-export", str(tmp_path / "dec"), "--run", str(tmp_path / "x")]
    assert main([*argv, "--data-root", str(fake_root)]) == 2
    err = capsys.readouterr().err
    assert "decode-only" in err and str(tmp_path / "dec") in err and "Traceback" not in err
