# One command per intent.
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: dev check test test-unprivileged test-asan bench ci

dev:  ## install for development
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -e '.[test]'

check:  ## lint: style, then the layer contracts in pyproject.toml
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

test:  ## the whole suite (what CI runs)
	$(PY) -m pytest

test-unprivileged:  ## the core suite as uid 65534 (needs root)
	scripts/test-unprivileged

test-asan:  ## the C relay built with ASan + UBSan (in build/asan) under thousands of sessions; fails on any report
	PY=$(PY) scripts/test-asan

bench:  ## cold start, proxy throughput, project creation (prints a table, writes JSON)
	$(PY) -m benchmarks.core

ci:
	bash .ci/run
