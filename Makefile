# The two commands: `make serve` and `make test`. Each builds .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Until the gRPC/HTTP server lands, `make serve` runs a greedy generation on the demo model.
SERVE_ARGS ?= generate --prompt "The capital of France is" --max-tokens 32
PYTEST_ARGS ?=

.PHONY: serve test clean-venv

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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
