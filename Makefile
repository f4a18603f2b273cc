# The README's commands. Everything runs from .venv, which `setup` creates from nothing (tools/setup.sh).
PY := .venv/bin/python
QUICKSTART := artifacts/quickstart

.PHONY: setup quickstart test test-fast lint format

setup:
	bash tools/setup.sh

## Build the tiny model + data (2-3 minutes, once), then train it with DAPO on CPU (under 2 minutes).
quickstart: setup
	$(PY) tools/make_quickstart.py --out $(QUICKSTART)
	.venv/bin/dapo-pl fit --config configs/quickstart.yaml

## The whole test suite, slow end-to-end tests included (what CI runs).
test: setup
	$(PY) -m pytest

## Skip the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	.venv/bin/ruff check dapo_pl verifiers tests tools
	.venv/bin/ruff format --check dapo_pl verifiers tests tools
	.venv/bin/mypy

format: setup
	.venv/bin/ruff check --fix dapo_pl verifiers tests tools
	.venv/bin/ruff format dapo_pl verifiers tests tools
