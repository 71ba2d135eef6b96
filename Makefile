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
AZUREML_PYTEST_ARGS ?=
# A second virtualenv pinned to the newest MLflow that azureml-mlflow supports, for the tests
# that go through azureml-mlflow's own client.
AZUREML_VENV := .venv-azureml
AZUREML_BIN := $(AZUREML_VENV)/bin
AZUREML_INSTALLED := $(AZUREML_VENV)/.installed
AZUREML_CONSTRAINTS := constraints/azureml.txt

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install demo test test-azureml rig-up rig-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(AZUREML_BIN)/python:
	$(PYTHON) -m venv $(AZUREML_VENV)

$(AZUREML_INSTALLED): setup.cfg pyproject.toml $(AZUREML_CONSTRAINTS) | $(AZUREML_BIN)/python
	$(AZUREML_BIN)/python -m pip install --quiet --upgrade pip
	$(AZUREML_BIN)/python -m pip install --quiet --constraint $(AZUREML_CONSTRAINTS) -e '.[azure,dev]'
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

# The test session starts its own rig in a temporary folder and stops it at the end.
# The tests through azureml-mlflow's own client follow, in their pinned virtualenv.
test: install
	$(BIN)/ruff check --quiet --select F,E9 mlflow_azdual tests rig examples benchmarks
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=600 -q $(PYTEST_ARGS) tests
	$(MAKE) test-azureml

# azureml-mlflow declares mlflow-skinny<=3.15.0, so its tests run in $(AZUREML_VENV), built
# from $(AZUREML_CONSTRAINTS); in .venv they are skipped.
test-azureml: $(AZUREML_INSTALLED) $(AZURITE)
	$(AZUREML_BIN)/python -m pytest -p no:cacheprovider --timeout=600 -q $(AZUREML_PYTEST_ARGS) tests/test_azureml_client.py tests/test_azureml_deploy.py
