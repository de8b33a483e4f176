# Two commands on a fresh machine with Python 3.11+ and make:
#   make run   - set everything up and serve on http://127.0.0.1:8000 (embedded PostgreSQL)
#   make test  - set everything up and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test browser cluster-tools cluster cluster-down cluster-status migrate stop status lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/ledger serve

migrate: $(VENV)/.installed-run
	$(BIN)/ledger migrate

# The embedded PostgreSQL of ./.ledger, whoever started it (`make run` stops it on exit;
# this is for one left behind, e.g. after `kill -9` of both the service and its watchdog).
stop: $(VENV)/.installed-run
	$(BIN)/ledger db stop

status: $(VENV)/.installed-run
	$(BIN)/ledger db status

test: $(VENV)/.installed-test browser cluster-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/e2e/test_docs.py renders the docs page in a real browser, Debian's Chromium:
# installed here when it is missing and this runs as root with apt-get; otherwise the
# test says what to install (and skips, or fails under CI).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the docs browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "note: install Chromium (Debian: apt-get install chromium) for the docs browser test"; fi; }

# PgBouncer and HAProxy, Debian's packages, for `make cluster` and the tests that run the
# service through them: installed here when missing and this runs as root with apt-get;
# otherwise this says what to install (and those tests fail under CI).
cluster-tools:
	@missing=""; for tool in pgbouncer haproxy; do \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note: install$$missing (Debian: apt-get install$$missing) for make cluster and its tests"; fi; fi

# A scaled-out deployment on loopback (README, "Scaling out"): primary + synchronous
# standby, PgBouncer, CLUSTER_INSTANCES instances, HAProxy on CLUSTER_PORT. Runs in the
# background until `make cluster-down`.
CLUSTER_INSTANCES ?= 2
CLUSTER_PORT ?= 8080
cluster: $(VENV)/.installed-run cluster-tools
	$(BIN)/ledger cluster up --instances $(CLUSTER_INSTANCES) --port $(CLUSTER_PORT)

cluster-down: $(VENV)/.installed-run
	$(BIN)/ledger cluster down

cluster-status: $(VENV)/.installed-run
	$(BIN)/ledger cluster status

lint: $(VENV)/.installed-test
	$(BIN)/ruff check ledger migrations tests loadtest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
