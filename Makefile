# Set-up and entry points. `make demo` and `make test` work on a fresh clone: each installs what
# it needs (a virtualenv with the package and its dev extra, Azurite from npm) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
AZURITE := .rig/node/node_modules/.bin/azurite-blob
AZURITE_VERSION := 3.37.0
RIG_STATE_DIR := .rig/state
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install demo test test-azureml rig-up rig-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(AZURITE):
	npm install --no-audit --no-fund --loglevel=error --prefix .rig/node azurite@$(AZURITE_VERSION)

install: $(INSTALLED) $(AZURITE)

# Starts the rig unless it is already running, runs the demo, and leaves the rig up so that
# both MLflow UIs can be opened; `make rig-down` stops it.
demo: install
	$(BIN)/python -m rig status --state-dir $(RIG_STATE_DIR) >/dev/null 2>&1 || \
		$(BIN)/python -m rig up --state-dir $(RIG_STATE_DIR)
	$(BIN)/python examples/demo.py --rig-state $(RIG_STATE_DIR)/state.json

rig-up: install
	$(BIN)/python -m rig up --state-dir $(RIG_STATE_DIR)

rig-down:
	$(BIN)/python -m rig down --state-dir $(RIG_STATE_DIR)

# The whole suite runs on the MLflow of .venv (the newest that pip resolves). Then noxfile.py's
# sessions tagged `matrix` run in virtualenvs under .nox/: the tests marked `smoke` on each
# older MLflow version, and the tests through azureml-mlflow's own client on the newest MLflow
# it supports. `make test MATRIX=` skips them. Each test session starts its own rig in a
# temporary folder and stops it at the end.
MATRIX ?= matrix

test: install
	$(BIN)/ruff check --quiet --select F,E9 mlflow_azdual tests rig examples benchmarks noxfile.py
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=600 -q $(PYTEST_ARGS) tests
	$(if $(MATRIX),$(BIN)/nox --tags $(MATRIX))

# Only the tests through azureml-mlflow's own client. azureml-mlflow declares
# mlflow-skinny<=3.15.0, so they run in the nox session `azureml`, built from
# constraints/azureml.txt; in .venv they are skipped.
test-azureml: install
	$(BIN)/nox -s azureml
