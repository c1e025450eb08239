# The two commands: `make serve` and `make test`. Each builds .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# `make serve`: gRPC on 127.0.0.1:50051 and the OpenAI HTTP API on 127.0.0.1:8000, demo model, CPU preset,
# tool calling on (hermes parser; the demo template lists the tools)
# (few buckets: starts in well under a minute). On a TPU/GPU VM pass a model and its preset:
#   SERVE_ARGS="serve meta-llama/Llama-3.2-1B --config tpu-v5e-8 --host 0.0.0.0" make serve   (`jaxserve presets` lists the presets)
SERVE_ARGS ?= serve --config cpu --host 127.0.0.1 --grpc-port 50051 --http-port 8000 \
  --enable-auto-tool-choice --tool-call-parser hermes
# `make test`: one line per test as it finishes (no silent minutes) and the 25 slowest at the end.
# It deselects the cases marked `slow` (long kernel sweeps and repeats of a check, each beside
# representative unmarked cases of the same check); `make test-all` runs them too. The test files
# are spread over PYTEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, so
# its module fixtures are built once), the heaviest files first (tests/conftest.py: HEAVY_FIRST):
# `make test PYTEST_WORKERS=0` runs them in this process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -v --durations=25 $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: serve test test-all clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Stamp files: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/jaxserve $(SERVE_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
