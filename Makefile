# Every target installs what it needs first, so a fresh machine with only
# Python 3.11 and make can run any of them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: install install-test run test bench lint format demo

# `make run` installs what tack needs to run and nothing else; the targets
# that test, measure or lint add the test extras (pytest, buildbot, ruff…).
install: $(STAMP)

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

install-test: $(TESTSTAMP)

$(TESTSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TESTSTAMP)

run: install
	$(BIN)/python -m tack

test: install-test
	$(BIN)/python -m pytest

bench: install-test
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: install-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install-test
	$(BIN)/python scripts/demo.py
