# The two commands of the README. Each creates .venv when missing and installs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here, in the install step: a CPU build of 2.13.0 is what pip finds locally,
# and an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint bench bench-gpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/contraseg demo --out demo_out

test: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -n 2 tests

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_losses.py --write
	$(BIN)/python bench/bench_augment.py --write

# On a machine with a CUDA GPU and PyTorch: the GPU checks and benchmarks (bench/gpu.sh).
bench-gpu:
	bench/gpu.sh
