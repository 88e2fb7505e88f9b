# Quick start: `make demo` (set up + CPU demo pretraining) and `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

VENV_NEXT ?= .venv-mcore019
PY_NEXT    = $(VENV_NEXT)/bin/python
# Lane 2 runs everything but the ablation runner's end-to-end test (5 min of training through the same
# entry point lane 1 already covers), to keep CI under 30 minutes on 2 cores.
NEXT_TESTS ?= --ignore=tests/integration/test_ablation_run.py

.PHONY: demo test test-next setup bench bench-next gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(VENV)/bin/mlf-pretrain --preset tiny-cpu --out runs/demo

test: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m pytest -q

# Second lane: megatron-core 0.19.2 declares Python >= 3.12; it installs and runs on 3.11 with
# --ignore-requires-python and numpy<2.5 (0.19's triton import is covered by compat.py's placeholder).
$(VENV_NEXT)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_NEXT)
	$(PY_NEXT) -m pip install --quiet --upgrade pip
	$(PY_NEXT) -m pip install --quiet torch==2.13.0
	$(PY_NEXT) -m pip install --quiet --ignore-requires-python megatron-core==0.19.2 'numpy<2.5'
	# the package and its other dependencies resolve normally (megatron-core 0.19.2 is already there)
	$(PY_NEXT) -m pip install --quiet -e '.[dev]'
	touch $(VENV_NEXT)/.installed

test-next: $(VENV_NEXT)/.installed
	TORCHDYNAMO_DISABLE=1 $(PY_NEXT) -m pytest -q $(NEXT_TESTS)

bench: $(STAMP)
	cd benchmarks && TORCHDYNAMO_DISABLE=1 ../$(PY) run_all.py

# Quantile balancing against Megatron-Core 0.19's own QB needs lane 2 (megatron-core 0.19.2).
bench-next: $(VENV_NEXT)/.installed
	cd benchmarks && TORCHDYNAMO_DISABLE=1 ../$(PY_NEXT) bench_quantile.py

# One GPU, at most 8 minutes: the card, the gpu/fp8 tests, 50 bf16 + 50 FP8 training steps, the router
# benchmark against Megatron's (fused) router; --dry-run prints the plan (benchmarks/gpu_check.py).
# On a GPU machine whose python already has CUDA torch and megatron-core (no network, no venv):
#   make gpu-check PY=python3      (PY given on the command line: the venv is not built)
gpu-check: $(if $(filter command line,$(origin PY)),,$(STAMP))
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(VENV_NEXT) runs
