# The two commands a newcomer needs: `make demo` and `make test`. Both install what
# they need (a venv with the package, PostgreSQL and Redis from Debian's packages)
# and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cfk-installed

.PHONY: help venv services services-stop lint test demo env-table collector clean

help:
	@echo "make demo    run the example app under opentelemetry-instrument and summarise its telemetry"
	@echo "make test    lint, type-check and run the whole test suite against real services"
	@echo "make lint    ruff and mypy only"
	@echo "make collector   build (or reuse) the otelcol-cfk collector binary"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

services:
	@scripts/services start >/dev/null

services-stop:
	@scripts/services stop

lint: venv
	$(BIN)/ruff check cfk_otel tests examples
	$(BIN)/ruff format --check cfk_otel tests examples
	$(BIN)/mypy

test: venv services lint
	$(BIN)/python -m pytest

demo: venv services
	$(BIN)/python examples/quickstart/demo.py $(DEMO_ARGS)

# Our OpenTelemetry Collector distribution, built with the Collector Builder and cached
# by the manifest's hash (an unchanged manifest is not rebuilt); see collector/BUILD-NOTES.md.
collector:
	collector/build.sh

# Rewrites the README's table of environment variables from cfk_otel/_settings.py.
env-table: venv
	$(BIN)/python scripts/update-env-table README.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
