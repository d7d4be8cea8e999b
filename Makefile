# streamcdp: the two commands are `make run` and `make test`; both do all the setup.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: help venv install infra infra-down infra-status run test unit integration bench clean

help:
	@echo "make run         venv + install + local Kafka/Redis + worker and collector (foreground)"
	@echo "make test        venv + install + local Kafka/Redis + the whole test suite"
	@echo "make infra       start local Kafka and Redis in the background (idempotent)"
	@echo "make infra-down  stop the Kafka and Redis that 'make infra' started"
	@echo "make bench       benchmarks, each printed beside its baseline"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (streamcdp needs Python 3.11)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv install: $(STAMP)

infra:
	bash deploy/local/infra.sh up

infra-down:
	bash deploy/local/infra.sh down

infra-status:
	bash deploy/local/infra.sh status

run: $(STAMP) infra
	bash deploy/local/run.sh

test: $(STAMP) infra
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/unit

integration: $(STAMP) infra
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/integration

bench: $(STAMP) infra
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
