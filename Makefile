# labq — `make run` starts everything on this machine; `make test` runs the whole suite.
# Needs python3 (3.11+) with venv (Debian: sudo apt-get install -y python3-venv) and a
# RabbitMQ broker (installed locally, or LABQ_RABBITMQ_URL pointing at one).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.labq-installed
PYTEST_ARGS ?=
# Test files run three at a time (pytest-xdist; one file's tests stay together, so a
# module's labq system is shared as before): most tests wait on processes, the broker or
# a browser, so three fit two cores. PYTEST_JOBS=0 runs them one after another.
PYTEST_JOBS ?= 3

.PHONY: help run test test-compose lint bench clean venv

help:
	@echo "make run    start labq (backend + workers) on http://127.0.0.1:8080, Ctrl-C stops"
	@echo "make test   run the whole test suite (needs RabbitMQ)"
	@echo "make test-compose  build the images and run docker-compose.yml under Podman (root; minutes)"
	@echo "make lint   ruff"
	@echo "make bench  every benchmark of bench/ (BENCH_DATABASE= skips PostgreSQL)"
	@echo "make clean  remove the venv, caches and ./data"

# The venv: created once with python3 (3.11 or newer).
$(BIN)/python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "labq needs Python 3.11 or newer; $(PYTHON) is %d.%d (set PYTHON=python3.11)" % v[:2])'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "could not create $(VENV): install venv support (Debian/Ubuntu: sudo apt-get install -y python3-venv)"; \
	  exit 1; }

# Install (again) only when pyproject.toml changed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/labq up

test: $(STAMP)
	$(BIN)/labq broker-check
	$(BIN)/pytest $(if $(filter-out 0,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

# docker-compose.yml for real: rootful Podman from Debian's packages builds the images and
# runs the stack (tests/compose/); not part of `make test`. Skips, saying why, without root.
test-compose: $(STAMP)
	PYTHON=$(PYTHON) tests/compose/install.sh
	LABQ_COMPOSE_TEST=1 $(BIN)/pytest -p no:cacheprovider -s tests/compose $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark runs, even after one missed its target; then the run fails naming them.
# BENCH_DATABASE: the PostgreSQL for job_list's second run (a schema of its own, dropped
# after); empty skips that run.
BENCH_DATABASE ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
BENCHES = "bench/load.py $(BENCH_ARGS)" bench/streams.py bench/slow_clients.py bench/job_list.py \
          $(if $(BENCH_DATABASE),"bench/job_list.py --database $(BENCH_DATABASE)") \
          bench/auth_get.py bench/job_overhead.py bench/scale_out.py bench/sandbox_start.py

bench: $(STAMP)
	$(BIN)/labq broker-check
	@missed=""; for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || missed="$$missed $$b"; done; \
	if [ -n "$$missed" ]; then echo "make bench: missed a target or failed:$$missed"; exit 1; fi

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
