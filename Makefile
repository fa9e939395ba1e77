# The two commands in the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel of torch pinned for development and CI (an unpinned torch would pull a multi-GB CUDA build).
TORCH := torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/scalekv: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH)"
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
