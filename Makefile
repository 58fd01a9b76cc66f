# MAOF: `make dev` runs the whole stack and a demo; `make test` runs every check.
SHELL := /bin/bash
PYTHON_SYSTEM ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Optional local overrides (copy .env.example to .env).
ifneq (,$(wildcard .env))
include .env
export
endif

.PHONY: help venv stack migrate dev test lint typecheck unit integration package down clean bench browser-deps

help:
	@echo "make dev      start Postgres, Redis, LocalStack, the API on :3000 and the SQS poller; run a demo"
	@echo "make test     start the stack, then lint, type check, unit and integration tests"
	@echo "make migrate  apply database migrations"
	@echo "make down     stop what the stack started"

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(STAMP)

stack: venv
	$(PY) -m chalicelib.local.stack up

migrate: stack
	$(PY) -m chalicelib.db.migrate

dev: migrate
	$(PY) -m chalicelib.local.dev

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy chalicelib

unit: venv
	$(PY) -m pytest tests/unit -q

integration: stack
	$(PY) -m pytest tests/integration -q

# The browser tests drive Debian's Chromium (never a browser Playwright downloads).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: stack lint typecheck browser-deps
	$(PY) -m pytest tests -q

# The prod SAM template merged with infra/template.json (queues, gateway responses) in build/package.
package: venv
	rm -rf build/package
	AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} \
	$(VENV)/bin/chalice package --stage prod --merge-template infra/template.json build/package

bench: migrate
	$(PY) -m bench

down:
	@test -x $(PY) && $(PY) -m chalicelib.local.stack down || true

clean: down
	rm -rf .maof build .pytest_cache .mypy_cache .ruff_cache
