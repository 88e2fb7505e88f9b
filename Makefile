# Quick start: `make demo` (set up + CPU demo pretraining) and `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test setup bench clean

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

clean:
	rm -rf $(VENV) runs
