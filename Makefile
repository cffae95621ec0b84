# fingerprint_lm — developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# where pip finds torch: empty = pip's own configuration (here: a local CPU wheel); elsewhere e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, or .../whl/cu128 for a GPU build
TORCH_INDEX ?=

.PHONY: help install test test-full bench format lint clean checkpoint

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## make .venv, install torch (CPU, pinned) first, then the package with dev+cluster extras
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev,cluster]"

test:  ## fast tests (8-9.5 minutes on 2 CPU cores; must stay under 10)
	$(PY) -m pytest -q -m "not slow" tests

test-full:  ## all tests, slow ones included
	$(PY) -m pytest -q tests

bench:  ## speed and memory figures, the SD-sized issue ratio and the default sweep cold and warm included (~40-50 min): writes BENCHMARKS.md
	$(PY) -m fingerprint_lm.bench --sweep --write BENCHMARKS.md

METHOD ?= pnm
checkpoint:  ## retrain a shipped checkpoint: METHOD=pnm (assets/embedded_pnm, default) | carrier (assets/embedded)
	$(PY) -m fingerprint_lm +experiment=train method=$(METHOD) export_checkpoint=true

format:  ## ruff format + autofix
	$(PY) -m ruff format fingerprint_lm hydra_plugins tests experiments
	$(PY) -m ruff check --fix fingerprint_lm hydra_plugins tests experiments

lint:  ## ruff check
	$(PY) -m ruff check fingerprint_lm hydra_plugins tests experiments

clean:  ## remove caches and run outputs (not the shipped checkpoint)
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
