# meddiff: two commands set everything up on a fresh machine with Python 3.11:
#   make demo   -> creates .venv, installs, trains + evaluates the MNIST-splotch demo on the CPU, writes a report
#   make test   -> creates .venv if missing, runs the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo demo-ct demo-adni demo-denoise demo-refiner benchmark test test-fast lint bench clean

install: $(STAMP)

# torch first (the CPU wheel here; on a GPU box install the CUDA build of the same version first), then the
# project: otherwise pip would pull a multi-GB CUDA build of torch as a dependency.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev,sweep]"
	touch $(STAMP)

# each demo runs into logs/<experiment>/<timestamp>/ and points logs/<experiment>/latest at it
demo: install
	bash scripts/run_demo.sh $(PY) demo $(DEMO_ARGS)

demo-ct: install
	bash scripts/run_demo.sh $(PY) demo_ct $(DEMO_ARGS)

demo-denoise: install
	bash scripts/run_demo.sh $(PY) demo_denoise $(DEMO_ARGS)

demo-adni: install
	bash scripts/run_demo.sh $(PY) demo_adni $(DEMO_ARGS)

# seed 003 (Brainomaly-Diff): stage 1 the coarse GAN, stage 2 the residual diffusion refiner on its frozen generator
demo-refiner: install
	bash scripts/run_demo.sh $(PY) demo_coarse $(DEMO_ARGS)
	bash scripts/run_demo.sh $(PY) demo_refiner model.coarse_ckpt=logs/demo_coarse/latest $(DEMO_ARGS)

# issue 18: every method x task at demo size (Hydra multirun; 12 jobs, ~41 min on 2 CPU cores), then
# leaderboard_<task>.md/csv/png in the sweep dir (logs/train/multiruns/<time>/);
# a subset: make benchmark BENCH_ARGS='-m +benchmark_uad=mnist_pddpm,mnist_dae'
BENCH_ARGS ?=
benchmark: install
	$(PY) -m meddiff.train experiment=benchmark_uad $(BENCH_ARGS)

test: install
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests bench scripts

bench: install
	$(PY) -m bench.bench_training_step --ema
	$(PY) -m bench.bench_patched_scoring --images 16 --size 28 --patch 14 --stride 7
	$(PY) -m bench.bench_patched_scoring --images 8 --size 64 --patch 32 --stride 16
	$(PY) bench/bench_rsna_cache.py

clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
