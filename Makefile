# The two commands a newcomer needs: `make demo` and `make test`. Both install what
# they need (a venv with the package, PostgreSQL and Redis from Debian's packages)
# and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cfk-installed
# The compiled core (native/, Rust): cargo comes from rustup, and its build output is kept
# beside the collector's cache, so a second `make` on the same machine only relinks.
export PATH := $(HOME)/.cargo/bin:$(PATH)
export CARGO_TARGET_DIR ?= $(HOME)/.cache/cfk-otel/cargo-target
# The collector's modules (contrib 0.165) need Go >= 1.26.9: the go command fetches this
# toolchain from the module proxy (collector/build.sh exports the same).
export GOTOOLCHAIN := go1.27.3
NATIVE := $(wildcard native/Cargo.toml native/Cargo.lock native/src/*.rs)

.PHONY: help venv venv-oldest services services-stop lint install-check test demo bench microbench env-table collector collector-check clean

help:
	@echo "make demo    run the example app under opentelemetry-instrument and summarise its telemetry"
	@echo "make test    lint, type-check and run the whole test suite against real services"
	@echo "             (also on the oldest OpenTelemetry SDK supported, in .venv-oldest)"
	@echo "make lint    ruff and mypy only"
	@echo "make install-check  a fresh install with each Python's bundled pip, then pip check"
	@echo "make bench   the overhead benchmark; writes docs/benchmarks.md (and runs microbench)"
	@echo "make microbench  per-call micro-benchmarks beside upstream; writes docs/microbenchmarks.md"
	@echo "make collector        build (or reuse) the otelcol-cfk collector binary"
	@echo "make collector-check  validate every backend's collector configuration"

$(STAMP): pyproject.toml $(NATIVE)
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

# The oldest OpenTelemetry family of the supported range (constraints/oldest.txt, the lower
# bounds of pyproject.toml's ranges), beside cfk_otel and the rest of the test extra: the
# test extra's own pins are the newest family. Reinstalled when either file changes; the
# compiled core is the one `make venv` built into the checkout (the install only relinks it).
OLDEST_VENV ?= .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
OLDEST_PINS := constraints/oldest.txt
OLDEST_STAMP := $(OLDEST_VENV)/.cfk-installed
$(OLDEST_STAMP): pyproject.toml $(OLDEST_PINS) scripts/test-requirements | $(STAMP)
	@test -x $(OLDEST_BIN)/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -m pip install -q --upgrade pip
	$(OLDEST_BIN)/python -m pip install -q -r $(OLDEST_PINS) -e . \
	  $$($(OLDEST_BIN)/python scripts/test-requirements --without $(OLDEST_PINS))
	$(OLDEST_BIN)/python -m pip check
	@touch $@

venv-oldest: $(OLDEST_STAMP)

services:
	@scripts/services start >/dev/null

services-stop:
	@scripts/services stop

lint: venv
	cargo fmt --manifest-path native/Cargo.toml --check
	cargo clippy --quiet --release --manifest-path native/Cargo.toml -- -D warnings
	$(BIN)/ruff check cfk_otel tests benchmarks examples scripts
	$(BIN)/ruff format --check cfk_otel tests benchmarks examples scripts
	$(BIN)/mypy
	$(BIN)/mypy benchmarks scripts/microbench.py

# A new user's install, on every supported Python present (3.11, 3.12, 3.13): a fresh
# venv with its bundled pip (not upgraded), the package from this checkout with no cache,
# then an upstream instrumentation added by a second `pip install`, then `pip check`
# (issue 18). The Pythons run in parallel, about 80 s; the .venv above is not used.
install-check:
	$(PYTHON) scripts/install-check

# The collector is built (or its cached build reused) before pytest, so a cold build's
# progress shows here rather than inside a test fixture.
# The whole suite on the native path, then the tests that launch apps again on the SDK
# path (CFK_TEST_NATIVE=false, see tests/conftest.py): the reference the core is held to.
# Then on the oldest OpenTelemetry family supported (.venv-oldest): the unit tests on the
# native path, and those app-launching tests on the SDK path, where the SDK does the most.
test: venv venv-oldest services collector lint collector-check install-check
	$(BIN)/python -m pytest
	CFK_TEST_NATIVE=false $(BIN)/python -m pytest tests/e2e tests/integration tests/examples
	$(OLDEST_BIN)/python -m pytest tests/test_*.py
	CFK_TEST_NATIVE=false $(OLDEST_BIN)/python -m pytest tests/e2e tests/integration tests/examples

# The example app (examples/kanban) with the whole telemetry path: the collector, a real
# Prometheus, a burst of traffic and a summary; DEMO_ARGS=--once exits after the summary.
# The demo starts PostgreSQL and Redis itself, so it can announce a fallback without apt.
demo: venv collector
	$(BIN)/python examples/kanban/demo.py $(DEMO_ARGS)

# The overhead benchmark (docs/benchmarks.md). Its own venv: the upstream baseline needs
# the stock opentelemetry-distro, which must not sit beside cfk_otel in the test venv.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.cfk-installed: pyproject.toml
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[test,bench]'
	@touch $@

bench: $(BENCH_VENV)/.cfk-installed services
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(BENCH_VENV)/bin/python scripts/bench.py $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python scripts/microbench.py $(MICROBENCH_ARGS)

# Micro-benchmarks (benchmarks/, pytest-benchmark): one span, histogram record, log line
# and 10,000-series scrape, each beside its upstream equivalent; writes docs/microbenchmarks.md.
# `make test` runs the same files once each, untimed, as a smoke test.
microbench: $(BENCH_VENV)/.cfk-installed
	$(BENCH_VENV)/bin/python scripts/microbench.py $(MICROBENCH_ARGS)

# Our OpenTelemetry Collector distribution, built with the Collector Builder and cached
# by the manifest's hash (an unchanged manifest is not rebuilt); see collector/BUILD-NOTES.md.
collector:
	@collector/build.sh >/dev/null

# Every backend's collector config validated alone, all together, each receiver (with the
# prometheus backend it exports through), and everything with the Kubernetes overlay
# (offline `otelcol-cfk validate`, dummy values for the variables). Datadog and CloudWatch
# twice: direct (agentless intake / AWS's endpoints with SigV4) and through an Agent/sidecar.
COLLECTOR_BACKENDS := debug prometheus loki sentry datadog cloudwatch
COLLECTOR_RECEIVERS := redis postgresql
COLLECTOR_DUMMY_ENV := LOKI_ENDPOINT=http://loki.invalid:3100/otlp \
	SENTRY_DSN=https://0123abcd@sentry.invalid/1 \
	DD_API_KEY=0123abcd DD_SITE=datadoghq.eu \
	AWS_REGION=eu-west-3 CLOUDWATCH_LOG_GROUP=/cf-kanban/check \
	AWS_ACCESS_KEY_ID=AKIDEXAMPLE AWS_SECRET_ACCESS_KEY=0123abcd AWS_EC2_METADATA_DISABLED=true \
	REDIS_EXPORTER_ENDPOINT=redis-exporter.invalid:9121 POSTGRES_EXPORTER_ENDPOINT=postgres-exporter.invalid:9187 \
	K8S_NODE_NAME=node-1.invalid
COLLECTOR_AGENT_ENV := DD_OTLP_ENDPOINT=http://datadog-agent.invalid:4318 \
	CLOUDWATCH_OTLP_ENDPOINT=http://cloudwatch-agent.invalid:4318

collector-check: collector
	@for b in $(COLLECTOR_BACKENDS) "$(COLLECTOR_BACKENDS)"; do \
	  env $(COLLECTOR_DUMMY_ENV) CFK_BACKENDS="$$b" collector/run --validate >/dev/null || exit 1; \
	  echo "collector config OK: $$b"; \
	done
	@for b in datadog cloudwatch "$(COLLECTOR_BACKENDS)"; do \
	  env $(COLLECTOR_DUMMY_ENV) $(COLLECTOR_AGENT_ENV) CFK_BACKENDS="$$b" collector/run --validate >/dev/null || exit 1; \
	  echo "collector config OK: $$b (Agent / sidecar routes)"; \
	done
	@for r in $(COLLECTOR_RECEIVERS); do \
	  env $(COLLECTOR_DUMMY_ENV) CFK_BACKENDS=prometheus CFK_RECEIVERS="$$r" collector/run --validate >/dev/null || exit 1; \
	  echo "collector config OK: prometheus + receiver $$r"; \
	done
	@env $(COLLECTOR_DUMMY_ENV) CFK_BACKENDS="$(COLLECTOR_BACKENDS)" CFK_RECEIVERS="$(COLLECTOR_RECEIVERS)" \
	  CFK_KUBERNETES=true collector/run --validate >/dev/null && echo "collector config OK: all + receivers + kubernetes"

# Rewrites the README's table of environment variables from cfk_otel/_settings.py.
env-table: venv
	$(BIN)/python scripts/update-env-table README.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(OLDEST_VENV) .pytest_cache .mypy_cache .ruff_cache
