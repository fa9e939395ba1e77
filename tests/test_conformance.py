"""Conformance against the reference implementations' outputs, for every fixture directory.

Fixtures are data: every directory under ../shared/fixtures (beside the project root) and every directory in
$SCALEKV_FIXTURES (os.pathsep-separated) whose config.json names a supported kind is checked the same way: a
model fixture names its model in "model", a data fixture its kind in "fixture"; each checker module claims the
kinds starting with its ``MODEL_PREFIX``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKERS = [importlib.import_module(f"tests.conformance.{name}") for name in ("var", "infinity", "release_selection")]


def fixture_dirs() -> list[Path]:
    dirs = []
    shared = ROOT.parent / "shared" / "fixtures"
    if shared.is_dir():
        dirs += sorted(p for p in shared.iterdir() if (p / "config.json").is_file())
    for entry in os.environ.get("SCALEKV_FIXTURES", "").split(os.pathsep):
        if entry:
            path = Path(entry)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"SCALEKV_FIXTURES entry {entry!r} is not a fixture directory with config.json")
            dirs.append(path)
    return dirs


def collect():
    params = []
    for d in fixture_dirs():
        cfg = json.loads((d / "config.json").read_text())
        kind = cfg.get("model") or cfg.get("fixture") or ""
        for checker in CHECKERS:
            if kind.startswith(checker.MODEL_PREFIX):
                for name, fn in checker.cases(d).items():
                    params.append(pytest.param(fn, id=f"{d.name}:{name}"))
    return params


PARAMS = collect()


def test_fixtures_found():
    assert PARAMS, "no supported fixture found under ../shared/fixtures or $SCALEKV_FIXTURES"


@pytest.mark.parametrize("check", PARAMS)
def test_fixture(check):
    check()
