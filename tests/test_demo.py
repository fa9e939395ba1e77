"""`scalekv demo`, the shipped demo model and the fidelity metrics."""

from __future__ import annotations

import json

import pytest
import torch

from scalekv.cache import POLICIES
from scalekv.cli import main
from scalekv.commands.demo import BUDGETS, cache_settings, run_demo, table
from scalekv.hub import DEMO_DIR, load_pipeline
from scalekv.metrics import psnr, ssim
from scalekv.models import VAR, VQVAE
from scalekv.pipeline import VARPipeline
from scalekv.training.presets import TOKENIZER_PRESETS, VAR_TRAIN_PRESETS
from scalekv.training.transformer import export_demo


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.all(psnr(x, x) == 100) and torch.allclose(ssim(x, x), torch.ones(2))
    small, large = x + 0.01 * torch.randn(x.shape, generator=g), x + 0.2 * torch.randn(x.shape, generator=g)
    assert torch.all(psnr(x, small) > psnr(x, large)) and torch.all(ssim(x, small) > ssim(x, large))
    torch.testing.assert_close(psnr(x, torch.zeros_like(x)), -10 * torch.log10(x.square().flatten(1).mean(1)))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="expected two equal"):
        psnr(x, x[:1])


def test_every_registered_policy_is_in_the_demo():
    settings = cache_settings()
    assert settings[0] == ("full", None, {})
    assert sorted({name for name, _, _ in settings}) == sorted(POLICIES)
    assert len(settings) == 1 + len(BUDGETS) * (len(POLICIES) - 1)
    two = cache_settings([0.1, 0.2])
    assert len(two) == 1 + 2 * (len(POLICIES) - 1) and {b for _, b, _ in two[1:]} == {0.1, 0.2}
    for bad in ([], [0.0], [1.5]):
        with pytest.raises(ValueError, match="budget"):
            cache_settings(bad)


@pytest.mark.parametrize("budgets", ["0", "0.1,x", "2"])
def test_demo_refuses_bad_budgets_before_loading(budgets, tmp_path, capsys):
    out = tmp_path / "out"
    try:  # argparse refuses what is not a list of numbers (SystemExit), the command the fractions out of range
        code = main(["demo", "--budgets", budgets, "--weights", str(tmp_path / "absent"), "--out", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "budget" in err and "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def tiny_demo_dir(tmp_path_factory):
    """A random-weight model in the exported demo layout (12x12 images, 4 scales)."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    from scalekv.training.common import Run, config_to_json

    vae_cfg, var_cfg = TOKENIZER_PRESETS["tiny"], VAR_TRAIN_PRESETS["tiny"]
    for stage, model, cfg in (("tokenizer", VQVAE(vae_cfg), vae_cfg), ("var", VAR(var_cfg), var_cfg)):
        run = Run(root / stage, {"stage": stage, "model": config_to_json(cfg)})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run.save(model, opt, 0, 0.0)
    export_demo(root / "tokenizer", root / "var", root / "out")
    return root / "out"


def test_demo_rows_compare_against_the_full_cache(tiny_demo_dir):
    pipe = load_pipeline("demo", str(tiny_demo_dir))
    sampling = {"cfg": 1.5, "top_k": 0, "top_p": 0.0}
    rows = run_demo(pipe, [0, 1, 2], seed=0, sampling=sampling, model="demo", weights=str(tiny_demo_dir))
    assert [(r.policy, r.budget) for r in rows] == [(n, b) for n, b, _ in cache_settings()]
    full = rows[0]
    for r in rows[1:]:
        assert r.stats["kv_bytes_history"] < full.stats["kv_bytes_history"]  # every policy compresses the history
        assert r.stats["kv_bytes_peak"] < full.stats["kv_bytes_peak"] < r.stats["kv_bytes_reference"]
        expected = psnr(r.images, full.images).mean().item()
        assert r.psnr == pytest.approx(expected)
    text = table(rows)
    assert text.count("\n") == len(rows) + 1 and "| full |" in text
    # this model ships no ScaleKV plans, so the demo calibrated one for it (and says so)
    scalekv = [r for r in rows if r.policy == "scalekv"]
    assert scalekv and all(r.options["plan"].startswith("calibrated now") for r in scalekv)


def test_demo_command_writes_grid_table_and_json(tiny_demo_dir, tmp_path, capsys):
    assert main(["demo", "--weights", str(tiny_demo_dir), "--out", str(tmp_path), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert len(results["rows"]) == len(cache_settings())
    assert (tmp_path / "demo_grid.png").stat().st_size > 0
    assert (tmp_path / "demo_table.md").read_text().strip() in printed
    from PIL import Image

    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.height >= len(results["rows"]) * 12 * 4


def test_shipped_demo_model():
    """The weights inside the package: loadable by name, <= 25 MB, >= 12 layers (deep enough for layers to
    specialise), a schedule with >= 8 scales and >= 300 tokens."""
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    pipe = load_pipeline("demo")
    assert isinstance(pipe, VARPipeline)
    cfg = pipe.model.cfg
    assert len(cfg.patch_nums) >= 8 and cfg.seq_len >= 300 and cfg.depth >= 12
    gen = pipe.generate([0, 9], seed=0)
    side = pipe.vae.cfg.image_size
    assert gen.images.shape == (2, 3, side, side) and torch.isfinite(gen.images).all()
