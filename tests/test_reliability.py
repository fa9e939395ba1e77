"""Issue 11, items 4-7: output checks before any model is loaded, one-line errors for bad files and values, calibrate
and eval argument handling, plan labels, and the VQVAE's training statistic under any schedule."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from scalekv.cache import make_cache
from scalekv.cache.base import make_scales
from scalekv.cache.plan import PLANS_DIR, load_plan, rule_plan
from scalekv.cache.scalekv import ScaleKV
from scalekv.checkpoint import CheckpointError, read_state_file, save_state_file
from scalekv.checks import check_seed
from scalekv.cli import main
from scalekv.hub import DEMO_DIR, default_plan
from scalekv.models.vqvae import VQVAE, load_vqvae
from scalekv.outputs import check_output_folder, previous_output, replace_output

from .helpers import tiny_pipeline, tiny_vae_config

SAMPLING = {"cfg": 1.5, "top_k": 10, "top_p": 0.0}


def _refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: every check under test must come first."""
    monkeypatch.setattr("scalekv.hub.load_pipeline", _refuse_loading)
    monkeypatch.setattr("scalekv.training.transformer.export_demo", _refuse_loading)


@pytest.fixture
def tiny_model(monkeypatch):
    pipe = tiny_pipeline(depth=4)
    monkeypatch.setattr("scalekv.hub.load_pipeline", lambda name, weights=None, **files: pipe)
    monkeypatch.setattr("scalekv.hub.default_sampling", lambda model, weights=None: dict(SAMPLING))
    return pipe


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody here can write in: a read-only one, or for root (whom modes do not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        return Path("/sys")
    try:
        (Path("/sys") / ".scalekv-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses writes to root")


# -- item 4: outputs -------------------------------------------------------------------------------------------
FOLDER_COMMANDS = {
    "generate": ["generate", "--model", "demo", "--labels", "1"],
    "demo": ["demo"],
    "eval": ["eval", "--model", "demo", "--n", "2", "--fid", "false"],
    "train export": ["train", "export", "--tokenizer", "tok", "--var", "var"],
}
FILE_COMMANDS = {
    "calibrate": ["calibrate", "--model", "demo", "--budget", "0.1"],
    "plan make": ["plan", "make", "--model", "var-d16", "--budget", "0.1", "--drafters", "0"],
}


def bad_out(kind: str, tmp_path: Path, want_file: bool) -> tuple[str, str]:
    """A path of ``kind`` and the text its error must contain."""
    if kind == "empty":
        return "", "--out ''"
    if kind == "file":  # a file where a folder is expected, or an existing file that is not ours
        path = tmp_path / ("notes.json" if want_file else "notes.txt")
        path.write_text("{}" if want_file else "mine")
        return str(path), str(path)
    if kind == "folder":  # a folder where a file is expected
        path = tmp_path / "plans.json"
        path.mkdir()
        return str(path), "is a folder"
    if kind == "under-file":
        (tmp_path / "notes.txt").write_text("mine")
        return str(tmp_path / "notes.txt" / ("p.json" if want_file else "out")), "lies under"
    if kind == "unwritable":
        folder = unwritable_folder(tmp_path)
        return str(folder / ("p.json" if want_file else "out")), "cannot write"
    if kind == "foreign":
        folder = tmp_path / "photos"
        folder.mkdir()
        (folder / "0000.png").write_bytes(b"someone else's")
        return str(folder), "'0000.png'"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "file", "under-file", "unwritable", "foreign"])
@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_folder_outputs_are_checked_before_any_model_loads(no_model, tmp_path, capsys, command, kind):
    out, message = bad_out(kind, tmp_path, want_file=False)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main([*FOLDER_COMMANDS[command], "--out", out]) == 2
    one_line_error(capsys, message, f"--out {out!r}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing written or changed


@pytest.mark.parametrize("kind", ["empty", "file", "folder", "under-file", "unwritable"])
@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_file_outputs_are_checked_before_any_model_loads(no_model, tmp_path, capsys, command, kind):
    out, message = bad_out(kind, tmp_path, want_file=True)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main([*FILE_COMMANDS[command], "--out", out]) == 2
    one_line_error(capsys, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_train_runs_refuse_a_foreign_folder(no_model, tmp_path, capsys):
    out, _ = bad_out("foreign", tmp_path, want_file=False)
    assert main(["train", "tokenizer", "--run", out]) == 2
    one_line_error(capsys, f"--run {out!r}", "training run")
    assert main(["train", "evaluate", "--tokenizer", "tok", "--grid", str(tmp_path / "photos")]) == 2
    one_line_error(capsys, "--grid", "is a folder")


def test_generate_replaces_its_own_earlier_output_and_never_mixes_runs(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--model", "tiny", "--labels", "1,2,3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "stats.json"]
    assert main(["generate", "--model", "tiny", "--labels", "4", "--seed", "5", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "stats.json"]  # the three old images are gone
    assert stats["labels"] == [4] and stats["seed"] == 5 and stats["images"] == ["0000.png"]
    # a file of someone else's inside the earlier output makes it foreign: refused, nothing touched
    (out / "notes.txt").write_text("mine")
    assert main(["generate", "--model", "tiny", "--labels", "1", "--out", str(out)]) == 2
    one_line_error(capsys, "'notes.txt'")
    assert json.loads((out / "stats.json").read_text()) == stats


def test_demo_replaces_its_own_earlier_output(monkeypatch, tmp_path):
    from scalekv.commands import demo

    images = torch.rand(len(demo.DEMO_LABELS), 3, 8, 8)

    def stats(history, peak, seconds):
        return {
            "kv_bytes_history": history,
            "kv_bytes_peak": peak,
            "kv_bytes_reference": 400,
            "seconds": seconds,
            "kv_history_ratio": history / 400,
            "kv_peak_ratio": peak / 400,
        }

    rows = [
        demo.DemoRow("full", None, {}, images, stats(100, 200, 1.0)),
        demo.DemoRow("snapkv", 0.1, {}, images, stats(10, 20, 0.5)),
    ]
    monkeypatch.setattr("scalekv.hub.load_pipeline", lambda name, weights=None: None)
    monkeypatch.setattr("scalekv.hub.default_sampling", lambda model, weights=None: dict(SAMPLING))
    monkeypatch.setattr(demo, "run_demo", lambda pipe, labels, seed, sampling, **kw: rows)
    out = tmp_path / "demo"
    for seed in (0, 7):
        assert main(["demo", "--out", str(out), "--seed", str(seed)]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(demo.DEMO_FILES)
        assert json.loads((out / "demo_results.json").read_text())["seed"] == seed


def test_eval_accepts_its_own_run_folder_and_refuses_others(tmp_path):
    from scalekv.commands.eval import check_out

    run = tmp_path / "run"
    (run / "images" / "full").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert check_out(str(run)) == run  # resumed; whether the settings match is the run's own check
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("x")
    with pytest.raises(ValueError, match="'results.csv'"):
        check_out(str(tmp_path / "other"))
    assert check_out(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_plan_outputs_replace_only_plans(tmp_path, capsys):
    args = ["plan", "make", "--model", "var-d16", "--budget", "0.1", "--drafters", "0", "--out"]
    path = tmp_path / "plan.json"
    assert main([*args, str(path)]) == 0
    assert main([*args[:-2], "0,1", "--out", str(path)]) == 0  # an earlier plan is replaced, as the help says
    assert load_plan(path).drafters[-2] == (0, 1)
    other = tmp_path / "settings.json"
    other.write_text('{"mine": true}')
    assert main([*args, str(other)]) == 2
    one_line_error(capsys, "settings.json", "not a file this command writes")
    assert other.read_text() == '{"mine": true}'


def test_an_interrupted_replacement_leaves_no_marker_and_no_half_file(tmp_path, monkeypatch):
    import scalekv.outputs

    files = lambda data: data["images"]  # noqa: E731
    folder = tmp_path / "out"
    replace_output(
        folder,
        {"0000.png": b"old0", "0001.png": b"old1", "stats.json": b'{"images": ["0000.png", "0001.png"]}'},
        "stats.json",
        files,
    )
    assert previous_output(folder, "stats.json", files) == ["0000.png", "0001.png", "stats.json"]
    real, calls = scalekv.outputs.atomic_write_bytes, []

    def fail_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(scalekv.outputs, "atomic_write_bytes", fail_second)
    with pytest.raises(OSError, match="disk full"):
        replace_output(
            folder, {"0000.png": b"new0", "0001.png": b"new1", "stats.json": b'{"images": []}'}, "stats.json", files
        )
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png"] and (folder / "0000.png").read_bytes() == b"new0"
    assert previous_output(folder, "stats.json", files) is None  # no marker: the next run refuses, never mixes
    with pytest.raises(ValueError, match="'0000.png'"):
        check_output_folder(folder, owned=lambda f: previous_output(f, "stats.json", files) is not None)


# -- item 5: files and values ----------------------------------------------------------------------------------
def test_truncated_and_corrupt_checkpoints_name_the_file(tmp_path):
    state = {"w": torch.randn(64, 64)}
    save_state_file(state, tmp_path / "full.safetensors")
    torch.save(state, tmp_path / "full.pth")
    for name in ("full.safetensors", "full.pth"):
        data = (tmp_path / name).read_bytes()
        half = tmp_path / f"half{Path(name).suffix}"
        half.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            read_state_file(half)
        assert str(half) in str(info.value) and "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is no pickle")
    with pytest.raises(CheckpointError, match=re.escape(f"{str(garbage)!r} is truncated or corrupt")):
        read_state_file(garbage)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_file(tmp_path)


class Trap:
    """A pickled object whose loading would run code: it writes a file."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_that_is_not_weights_only_safe_is_refused_without_running_it(tmp_path):
    trap = Trap()
    trap.path = str(tmp_path / "ran")
    torch.save({"w": torch.zeros(2), "trap": trap}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_file(tmp_path / "evil.pth")
    message = str(info.value)
    assert "evil.pth" in message and "not weights-only safe" in message and "\n" not in message
    assert "weights_only" not in message  # never the advice to unpickle anyway
    assert not (tmp_path / "ran").exists()


def test_corrupt_weights_and_config_through_the_cli(tmp_path, capsys):
    import shutil

    weights = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, weights)
    data = (weights / "var.safetensors").read_bytes()
    (weights / "var.safetensors").write_bytes(data[:1000])
    assert (
        main(["generate", "--model", "demo", "--weights", str(weights), "--labels", "1", "--out", str(tmp_path / "a")])
        == 2
    )
    one_line_error(capsys, str(weights / "var.safetensors"), "truncated or corrupt")
    (weights / "config.json").write_text('{"var": {"depth": 6,')
    assert (
        main(["generate", "--model", "demo", "--weights", str(weights), "--labels", "1", "--out", str(tmp_path / "b")])
        == 2
    )
    one_line_error(capsys, str(weights / "config.json"), "not valid JSON")
    (weights / "config.json").write_text('{"sampling": {"cfg": 1, "top_k": 0, "top_p": 0}, "var": {"depth": 6}}')
    assert (
        main(["generate", "--model", "demo", "--weights", str(weights), "--labels", "1", "--out", str(tmp_path / "c")])
        == 2
    )
    one_line_error(capsys, str(weights / "config.json"), "'var' and 'vae'")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_infinity_model_config_errors_name_the_file(tmp_path):
    from scalekv.infinity_pipeline import read_custom_config

    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=re.escape(f"{str(tmp_path / 'config.json')!r} is not valid JSON")):
        read_custom_config(tmp_path)
    (tmp_path / "config.json").write_text('{"infinity": {"depth": "x"}, "vae": {}}')
    with pytest.raises(CheckpointError, match="config.json"):
        read_custom_config(tmp_path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "cuda:x"], "--device 'cuda:x'"),
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**63)], f"--seed {2**63}"),
        (["--policy", "scalekv", "--plan", "FOLDER"], "is a folder"),
    ],
)
def test_generate_refuses_bad_values_before_loading(no_model, tmp_path, capsys, extra, message):
    extra = [str(tmp_path) if x == "FOLDER" else x for x in extra]
    assert main(["generate", "--model", "demo", "--labels", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use CUDA")
@pytest.mark.parametrize("command", ["generate", "calibrate", "eval"])
def test_cuda_on_a_torch_without_it_is_refused(no_model, tmp_path, capsys, command):
    argv = {
        "generate": ["generate", "--model", "demo", "--labels", "1", "--out", str(tmp_path / "o")],
        "calibrate": ["calibrate", "--model", "demo", "--budget", "0.1", "--out", str(tmp_path / "p.json")],
        "eval": ["eval", "--model", "demo", "--n", "2", "--out", str(tmp_path / "o")],
    }[command]
    assert main([*argv, "--device", "cuda"]) == 2
    one_line_error(capsys, "--device 'cuda'", "CUDA")


def test_seeds_are_integers_in_range():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 1.5, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=re.escape(f"seed={bad!r}: expected an integer seed in [0, 2**63)")):
            check_seed(bad)
    with pytest.raises(ValueError, match="seed \\+ 9"):
        check_seed(2**63 - 5, count=10)
    pipe = tiny_pipeline()
    for bad in (1.5, -1, 2**63):
        with pytest.raises(ValueError, match=re.escape(f"seed={bad!r}")):
            pipe.generate([1], seed=bad)


def test_labels_must_be_integer_class_ids():
    pipe = tiny_pipeline()
    for bad in (None, ["1", "2"], "12", [1.0], [[1]], [], [True]):
        with pytest.raises(ValueError, match="expected a non-empty 1-D sequence of integer class ids"):
            pipe.generate(bad)


def test_scalekv_drafters_must_be_layer_lists():
    for bad, message in (
        (0, "drafters=0: expected a list"),
        ("01", "drafters='01': expected a list"),
        ([0.5], "got 0.5"),
        ({2: 1}, "drafters[2]=1"),
        ({"2": [0]}, "scale indices"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ScaleKV(budget=0.2, drafters=bad)
    with pytest.raises(ValueError, match="plan=3"):
        ScaleKV(budget=0.2, plan=3)
    assert ScaleKV(budget=0.2, drafters=(0,)).drafters == [0]


def test_infinity_size_must_be_a_height_width_pair():
    from .test_infinity import random_text
    from .test_infinity import tiny_pipeline as tiny_infinity

    pipe = tiny_infinity()
    with pytest.raises(ValueError, match=re.escape("size='256x256': expected (height, width)")) as info:
        pipe.generate(random_text([3]), size="256x256")
    assert "parse_size" in str(info.value)
    for bad in ((256,), (256.0, 256), [256, True]):
        with pytest.raises(ValueError, match="expected \\(height, width\\)"):
            pipe.generate(random_text([3]), size=bad)
    with pytest.raises(ValueError, match="seed=1.5"):
        pipe.generate(random_text([3]), size=(256, 256), seed=1.5)


# -- item 6: calibrate, eval's policy options, plan labels ------------------------------------------------------
def test_calibrate_budget_one_gives_the_keep_everything_plan_without_a_pass(tiny_model, tmp_path, monkeypatch):
    module = importlib.import_module("scalekv.calibration.calibrate")
    monkeypatch.setattr(module, "collect_stats", _refuse_loading)
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny", "--budget", "1.0", "--samples", "2", "--out", str(out)]) == 0
    plan = load_plan(out)
    assert plan.budget == 1.0 and plan.compressed_scales == [] and all(not d for d in plan.drafters)
    assert [list(c) for c in plan.capacities] == [[s.end] * 4 for s in make_scales([(p, p) for p in range(1, 7)])]
    assert not (tmp_path / "plan_asi.png").exists()
    assert module.calibrate(tiny_model, 1.0, samples=2).capacities == plan.capacities
    gen = tiny_model.generate([1], cache=make_cache("scalekv", plan=out), **SAMPLING)
    prefix = tiny_model.model.cfg.scales[-1].start
    assert gen.scales[-2].cache_lengths == [prefix] * 4  # the whole prefix reaches the last scale


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0"], "budget=0.0"),
        (["--samples", "0"], "--samples 0"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--drafters", "-1"], "--drafters -1"),
        (["--refiner-start", "0"], "--refiner-start 0.0"),
        (["--refiner-start", "0.5", "--refiner-end", "0.9"], "--refiner-end 0.9 > --refiner-start 0.5"),
        (["--grid", "0"], "grid=0"),
        (["--kernel", "4"], "kernel=4"),
        (["--threads", "0"], "--threads 0"),
        (["--device", "foo"], "--device 'foo'"),
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**63 - 2), "--samples", "64"], "the last seed used"),
    ],
)
def test_calibrate_checks_every_argument_before_loading(no_model, tmp_path, capsys, extra, message):
    argv = ["calibrate", "--model", "demo", "--budget", "0.1", "--out", str(tmp_path / "p.json")]
    assert main([*argv, *extra]) == 2
    one_line_error(capsys, message)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_checks_model_dependent_arguments_before_the_pass(monkeypatch):
    from scalekv.calibration.calibrate import calibrate

    pipe = tiny_pipeline(depth=4)
    monkeypatch.setattr(pipe, "generate", _refuse_loading)
    with pytest.raises(ValueError, match="num_drafters=999: expected an integer in 0.."):
        calibrate(pipe, 0.1, samples=2, num_drafters=999)
    with pytest.raises(ValueError, match="combine='max'"):
        calibrate(pipe, 0.1, samples=2, combine="max")
    with pytest.raises(ValueError, match="refiner_end=0.9 > refiner_start=0.5"):
        calibrate(pipe, 0.1, samples=2, refiner_start=0.5, refiner_end=0.9)
    with pytest.raises(ValueError, match="seed=-1"):
        calibrate(pipe, 0.1, samples=2, seed=-1)


def test_eval_policy_options_keep_the_shipped_plan_unless_a_plan_is_given(tmp_path):
    from scalekv.evaluation import EvalConfig
    from scalekv.evaluation.runner import Setup, make_setup_cache

    shipped = default_plan("demo", 0.1)
    assert shipped is not None

    def cache(options):
        config = EvalConfig(model="demo", out=str(tmp_path / "r"), fid=False, policy_options={"scalekv": options})
        return make_setup_cache(Setup("scalekv", 0.1), config)

    with_grid = cache({"grid": 2})
    assert with_grid.grid == 2 and with_grid.fixed_plan == load_plan(shipped)
    depth = json.loads((DEMO_DIR / "config.json").read_text())["var"]["depth"]
    other = rule_plan(make_scales([(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 12)]), depth, 0.1, [1], model="demo")
    other.save(tmp_path / "mine.json")
    assert cache({"plan": str(tmp_path / "mine.json")}).fixed_plan == other
    by_rule = cache({"drafters": [0]})
    assert by_rule.fixed_plan is None and by_rule.drafters == [0]


def test_plans_whose_labels_disagree_with_their_capacities_are_refused(tmp_path):
    plan = rule_plan(make_scales([(p, p) for p in range(1, 11)]), 4, 0.1, [0], model="")
    data = plan.to_dict()
    for key, value, message in (
        (
            "budget",
            0.2,
            "budget 0.2 means B = 57 tokens per layer of the 285-token prefix, but the capacities keep B = 28",
        ),
        ("model", "var-d16", "model 'var-d16' has 16 layers"),
        ("model", "infinity-2b", "model 'infinity-2b' has 32 layers"),
    ):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**data, key: value}))
        with pytest.raises(ValueError, match=re.escape(f"plan file {str(path)!r} is mislabelled: {message}")):
            load_plan(path)
    with pytest.raises(ValueError, match="mislabelled"):
        load_plan(PLANS_DIR / "infinity_2b_10pct.json", budget=0.2)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({**data, "model": "anything"}))
    assert load_plan(path) == dataclasses.replace(plan, model="anything")


@pytest.mark.parametrize(
    "path",
    [
        *sorted(PLANS_DIR.glob("*.json")),
        *sorted(p for p in (DEMO_DIR / "plans").glob("*.json") if p.name != "head_stats.json"),
    ],
    ids=lambda p: p.name,
)
def test_shipped_plans_load_with_their_capacities_exactly(path):
    plan = load_plan(path)
    raw = json.loads(path.read_text())
    if "scales" in raw:
        assert [tuple(s["capacity"]) for s in raw["scales"]] == list(plan.capacities)
    else:  # released: "Scale N" applies after scale N - 2, drafters keep Max, refiners Min
        for key, entry in raw.items():
            k = int(key.removeprefix("Scale ")) - 2
            flags = [entry[f"Block {i}"] for i in range(plan.num_layers)]
            assert list(plan.capacities[k]) == [entry["Max"] if f else entry["Min"] for f in flags]
        assert plan.budget == 0.1


# -- item 7: the VQVAE's training statistic --------------------------------------------------------------------
def test_a_vqvae_of_any_schedule_takes_the_ten_scale_statistic(tmp_path):
    cfg = tiny_vae_config(patch_nums=(1, 2, 3, 4, 5, 6), with_encoder=False)
    state = VQVAE(cfg).state_dict()
    key = "quantize.ema_vocab_hit_SV"
    assert state[key].shape == (6, cfg.vocab_size)
    state[key] = torch.rand(10, cfg.vocab_size)  # the official file: one row per scale of the 10-scale schedule
    save_state_file(state, tmp_path / "vae.safetensors")
    vae = load_vqvae(str(tmp_path / "vae.safetensors"), cfg)
    assert torch.equal(vae.quantize.ema_vocab_hit_SV, state[key])
    for name, value in vae.state_dict().items():
        if name != key:
            assert torch.equal(value, state[name])
    # every other key stays strict, and so does the statistic's vocabulary side
    for change, message in (
        ({key: torch.rand(10, cfg.vocab_size + 1)}, "mis-shaped"),
        ({"decoder.conv_in.bias": torch.zeros(3)}, "mis-shaped"),
        ({"extra.weight": torch.zeros(1)}, "unexpected"),
    ):
        save_state_file({**state, **change}, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_vqvae(str(tmp_path / "bad.safetensors"), cfg)
    missing = {k: v for k, v in state.items() if k != "post_quant_conv.bias"}
    save_state_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_vqvae(str(tmp_path / "missing.safetensors"), cfg)
