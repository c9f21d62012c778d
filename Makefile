# Two entry points (see README.md): `make demo` trains the reference job, `make test` runs the tests.
# Both create/reuse a local virtualenv in .venv and install the pinned stack into it.
# ACCEL=cuda installs the CUDA build of fbgemm instead of the CPU one (GPU machines).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
ACCEL ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ACCEL)
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): requirements/$(ACCEL).txt requirements/hf.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/$(ACCEL).txt -r requirements/hf.txt
	# torchrec's metadata asks for the CUDA fbgemm wheel and torchmetrics 1.0.3: skip its deps.
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/lightning-hybrid fit -c recipes/quickstart.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_hybrid tests benchmarks

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/strategy_overhead.py

clean:
	rm -rf $(VENV) runs lightning_logs
