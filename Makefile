# The two commands: `make serve` and `make test`. Each works on a fresh machine
# with only Python and this repo: it builds .venv, fetches models into the
# git-ignored .cache/, then serves or tests.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Kernel tests need Python 3.12 + JAX 0.11 (see docs/kernels.md).
# The first python3.12 that actually runs (a pyenv shim may exist yet fail when 3.12 is not the active version).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c '' >/dev/null 2>&1 && { command -v $$p; break; }; done)
KVENV := .venv-kernels
KPY := $(KVENV)/bin/python
export SGLAX_CACHE ?= $(CURDIR)/.cache
MODEL ?= $(SGLAX_CACHE)/models/SmolLM2-135M-Instruct
HOST ?= 127.0.0.1
PORT ?= 30000

.PHONY: serve test venv dev models fixtures kernels-venv test-main test-kernels lint clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev

models: $(VENV)/.runtime
	$(PY) scripts/fetch_models.py

fixtures: dev models
	$(PY) scripts/build_test_fixtures.py

$(KVENV)/.ok: Makefile
	@if [ -z "$(PYTHON312)" ]; then echo "no python3.12: kernel tests will be skipped"; exit 0; fi; \
	$(PYTHON312) -m venv $(KVENV) && \
	$(KPY) -m pip install -q --upgrade pip && \
	$(KPY) -m pip install -q 'jax==0.11.2' 'jaxlib==0.11.2' absl-py numpy pytest pytest-timeout pytest-xdist && \
	touch $@

kernels-venv: $(KVENV)/.ok

serve: models
	$(PY) -m server.launch_server --model-path $(MODEL) --host $(HOST) --port $(PORT)

# Two workers, each given whole files (their module-scoped servers start once): on the 2-core
# dev box the suite took 30 minutes this way against 44 one file after another (README, "Tests").
# The kernel tests take two workers too (138 -> 88 s there).
TEST_WORKERS ?= 2

test-main: fixtures
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

test-kernels: kernels-venv
	@if [ -x $(KPY) ]; then $(KPY) -m pytest -q -m kernels -n $(TEST_WORKERS) tests/kernels; else echo "kernel tests skipped: no python3.12"; fi

test: lint test-main test-kernels

lint: dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(KVENV)
