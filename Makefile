# bezoar-jobs: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv on first use from requirements/lock.txt (no resolver: every version pinned,
# installed with --no-deps), torch==2.13.0 (CPU build) first. The venv is reused until the lock
# file or pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BEZOAR := $(VENV)/bin/bezoar
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
LOCK_HASH := $(shell sha256sum requirements/lock.txt | cut -c1-16)
LOCKED := $(VENV)/.installed-$(LOCK_HASH)
# the package itself (entry points, metadata) is reinstalled, cheaply, when pyproject.toml changes
STAMP := $(VENV)/.editable-$(LOCK_HASH)
RUN ?= runs/demo
PYTEST_ARGS ?=

.PHONY: help venv demo test lint fmt lock clean manifests

help:
	@echo "make demo   - install (once) and run the whole recipe on the embedded default into $(RUN)"
	@echo "make test   - install (once) and run the test suite"
	@echo "make lint   - ruff and mypy (make test runs them first)"
	@echo "make manifests - regenerate manifests/ (plain YAML for kubectl apply)"
	@echo "make lock   - re-pin requirements/lock.txt from the current venv"

venv: $(STAMP)

$(LOCKED):
	@if [ -d $(VENV) ]; then echo "no venv for this lock file: (re)building $(VENV)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -r requirements/lock.txt
	@touch $@

$(STAMP): $(LOCKED) pyproject.toml
	$(PIP) install -q --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(BEZOAR) run --recipe recipes/demo.yaml --run $(RUN)
	@$(BEZOAR) status --run $(RUN)

# the test command runs the linters first: ruff (line length 120) and mypy over bezoar_jobs
# the slowest tests are listed at the end: the suite must stay under 20 minutes on CI's 2 cores
test: lint
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# manifests/ is generated from fixed example inputs (examples/cluster.yaml, the chart's values);
# never edit it by hand. A test fails when it is stale.
manifests: $(STAMP)
	$(PY) scripts/gen_manifests.py

# Re-pin after changing dependencies: install what you need into .venv, then `make lock`.
lock:
	$(PIP) freeze --exclude-editable | grep -v -iE '^(torch==|bezoar)' > requirements/lock.txt

clean:
	rm -rf $(VENV) runs dist .pytest_cache

-include mk/k8s.mk
