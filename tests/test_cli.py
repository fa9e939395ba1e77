"""The ``scalekv`` command line: every command module is listed, and every command's help renders."""

from __future__ import annotations

import json
import pkgutil

import numpy as np
import pytest
import torch
from PIL import Image

import scalekv.commands
from scalekv.cli import COMMANDS, build_parser, main

NAMES = [m.__name__.rsplit(".", 1)[-1] for m in COMMANDS]


def test_every_command_module_is_a_subcommand():
    modules = {m.name for m in pkgutil.iter_modules(scalekv.commands.__path__)}
    assert sorted(NAMES) == sorted(modules)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_help_renders(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: scalekv {name}")


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'compress'" in capsys.readouterr().err


def test_generate_on_the_demo_model_uses_its_sampling_and_calibrated_plan(tmp_path):
    from scalekv.cache import make_cache
    from scalekv.hub import default_plan, default_sampling, load_pipeline

    out = tmp_path / "run"
    assert main(["generate", "--model", "demo", "--labels", "3,7", "--policy", "scalekv", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    sampling = default_sampling("demo")
    assert {k: stats[k] for k in sampling} == sampling  # the demo model's own settings, not VAR's 1.5/900/0.96
    plan = default_plan("demo", 0.1)
    assert stats["plan"] == str(plan) and stats["budget"] == 0.1
    direct = load_pipeline("demo").generate([3, 7], cache=make_cache("scalekv", plan=plan), seed=0, **sampling)
    assert stats["cache_lengths_per_scale"] == [r.cache_lengths for r in direct.scales]
    assert stats["kv_bytes_history"] == direct.kv_bytes_history and stats["kv_bytes_peak"] == direct.kv_bytes_peak
    saved = np.stack([np.asarray(Image.open(out / name)) for name in stats["images"]])
    expected = direct.images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(saved, expected)


def test_generate_without_labels_makes_one_image_per_named_class_and_refuses_otherwise(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--model", "demo", "--policy", "snapkv", "--budget", "0.1", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["labels"] == list(range(10)) and len(stats["images"]) == 10
    assert main(["generate", "--model", "var-d16", "--out", str(tmp_path / "other")]) == 2
    assert "--labels is required for 'var-d16'" in capsys.readouterr().err


def test_infinity_scalekv_without_plan_takes_the_released_plan_at_1024_only():
    from scalekv.cache.plan import PLANS_DIR
    from scalekv.commands.generate import cache_from_args
    from scalekv.schedules import get_schedule

    argv = ["generate", "--model", "infinity-2b", "--prompt", "a fox", "--policy", "scalekv", "--budget", "0.1"]
    args = build_parser().parse_args([*argv, "--out", "unused"])
    cache = cache_from_args(args, get_schedule(1.0, "1M"))
    assert args.plan == str(PLANS_DIR / "infinity_2b_10pct.json")
    assert cache.budget == 0.1 and cache.fixed_plan.average_capacity == 650
    args = build_parser().parse_args([*argv, "--out", "unused"])
    with pytest.raises(ValueError, match="exactly one of plan"):  # 512x512: no released plan, --plan is needed
        cache_from_args(args, get_schedule(1.0, "0.25M"))


def test_every_model_has_one_registry_entry_that_the_helpers_read():
    """The registry is the one place that knows a model: the hub's helpers and the commands read its entries."""
    from scalekv import hub

    assert hub.model_names() == sorted(hub.MODELS)
    for name, entry in hub.MODELS.items():
        assert entry.name == name and entry.input_kind in (hub.LABELS, hub.PROMPTS)
        assert hub.input_kind(name) == entry.input_kind
        assert entry.weight_files, name
        if entry.sampling is not None:
            assert hub.default_sampling(name) == entry.sampling
        for percent, _ in entry.plans:
            path = hub.default_plan(name, percent / 100)
            assert path is not None and path.is_file(), (name, percent)
    prompted = {n for n, e in hub.MODELS.items() if e.input_kind == hub.PROMPTS}
    assert prompted == {"infinity", "infinity-2b", "infinity-8b"}
    assert hub.default_sampling("demo") == hub.MODELS["demo"].sampling_for(None)
    assert hub.input_kind("a-pipeline-given-directly") == hub.LABELS
    with pytest.raises(ValueError, match="unknown model 'var-d99': expected one of"):
        hub.load_pipeline("var-d99")
