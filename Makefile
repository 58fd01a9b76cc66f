# MAOF: `make dev` runs the whole stack and a demo; `make test` runs every check.
SHELL := /bin/bash
PYTHON_SYSTEM ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Optional local overrides (copy .env.example to .env). A value in the environment wins over
# .env's (an empty one counts as unset, as in the settings): make lets a makefile's assignment
# beat the environment, so the environment's values are kept aside and put back after .env.
ifneq (,$(wildcard .env))
FROM_ENVIRONMENT := $(strip $(foreach v,$(.VARIABLES),\
	$(if $(filter environment,$(origin $(v))),$(if $(value $(v)),$(v)))))
$(foreach v,$(FROM_ENVIRONMENT),$(eval FROM_ENVIRONMENT.$(v) := $$(value $(v))))
include .env
$(foreach v,$(FROM_ENVIRONMENT),\
	$(if $(filter file,$(origin $(v))),$(eval $(v) := $$(FROM_ENVIRONMENT.$(v)))))
export
# Names with a dot are never exported; the list is not for the recipes either.
unexport FROM_ENVIRONMENT
endif

.PHONY: help venv stack migrate dev test lint typecheck unit integration chaos package down clean bench browser-deps deploy destroy secrets deploy-info rotate-key retire-keys reencrypt-agent-tokens

help:
	@echo "make dev      start Postgres, Redis, LocalStack, the API on :3000 and the SQS poller; run a demo"
	@echo "make test     start the stack, then lint, type check, and the unit, integration, fault and browser tests"
	@echo "make venv     the virtualenv in .venv, with the maof command line (.venv/bin/maof --help)"
	@echo "make migrate  apply database migrations"
	@echo "make chaos    restart or freeze Postgres, Redis, LocalStack (and kill or freeze the poller) mid-drain on an isolated stack; print what ended"
	@echo "make down     stop what the stack started"
	@echo "make package  chalice package STAGE (default prod) with infra/template.json merged, into build/package"
	@echo "make secrets  create the SSM SecureString parameters a deployed STAGE reads"
	@echo "make deploy   package, create/update the stack maof-STAGE, migrate, publish the dashboard"
	@echo "make destroy  delete the stack maof-STAGE (asks first; YES=1 skips the question)"
	@echo "make rotate-key KEY=jwt-secret|secret-key|audit-signing-key   rotate a deployed key without downtime"
	@echo "make retire-keys KEY=…                       drop the key rotate-key kept as previous"

# The project itself is installed (editable, only maof_client/) for the `maof` console script.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

stack: venv
	$(PY) -m devstack.stack up

migrate: stack
	$(PY) -m chalicelib.db.migrate

dev: migrate
	$(PY) -m devstack.dev

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy chalicelib devstack infra maof_client

unit: venv
	$(PY) -m pytest tests/unit -q

integration: stack
	$(PY) -m pytest tests/integration -q -n 2 --dist loadfile

# The browser tests drive Debian's Chromium (never a browser Playwright downloads).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Two workers (pytest-xdist), each a test session of its own (tests/conftest.py), each taking
# whole files (a file's tests share its module fixtures and run in their order); then the
# fault suite, whose timings are asserted, alone. Both run; either failing fails the target.
test: stack lint typecheck browser-deps
	$(PY) -m pytest tests -q -n 2 --dist loadfile --ignore=tests/faults; parallel=$$?; \
	$(PY) -m pytest tests/faults -q; faults=$$?; \
	exit $$(( parallel || faults ))

# The outage part of the fault suite on its own (tests/faults/chaos.py): its own Postgres,
# Redis and LocalStack under .maof/chaos/, stopped at the end. Knobs: CHAOS_ARGS="--help".
chaos: venv
	$(PY) -m tests.faults.chaos $(CHAOS_ARGS)

# ---------------------------------------------------------------- AWS (see docs/deploy.md)
# STAGE is the Chalice stage (.chalice/config.json) and names the stack maof-$(STAGE), whose
# resources all take their names from it: stages live side by side in one account and region.
# The AWS CLI (requirements-dev.txt) packages and deploys the stack; python -m infra does the rest.
STAGE ?= prod
INFRA = $(PY) -m infra --stage $(STAGE) $(if $(REGION),--region $(REGION)) \
	$(if $(SECRETS_PATH),--secrets-path $(SECRETS_PATH)) $(if $(SECRETS_KMS_KEY_ARN),--kms-key-id $(SECRETS_KMS_KEY_ARN))
# The AWS CLI v1 reads AWS_DEFAULT_REGION or the profile's region, not AWS_REGION: pass it on.
AWS_CLI_REGION = $(or $(REGION),$(AWS_REGION))
AWS = $(PY) -m awscli $(if $(AWS_CLI_REGION),--region $(AWS_CLI_REGION))
# Stack parameters; on an update, those not given keep their values.
STACK_PARAMETERS = $(if $(SUBNET_IDS),SubnetIds=$(SUBNET_IDS)) \
	$(if $(SECURITY_GROUP_IDS),SecurityGroupIds=$(SECURITY_GROUP_IDS)) \
	$(if $(ALARM_EMAIL),AlarmEmail=$(ALARM_EMAIL)) $(if $(CORS_ORIGIN),CorsOrigin=$(CORS_ORIGIN)) \
	$(if $(LOG_RETENTION_DAYS),LogRetentionDays=$(LOG_RETENTION_DAYS)) \
	$(if $(AUDIT_BUCKET),ExistingAuditBucketName=$(AUDIT_BUCKET)) \
	$(if $(SECRETS_KMS_KEY_ARN),SecretsKmsKeyArn=$(SECRETS_KMS_KEY_ARN)) \
	$(if $(API_RATE_LIMIT),ApiThrottlingRateLimit=$(API_RATE_LIMIT)) \
	$(if $(API_BURST_LIMIT),ApiThrottlingBurstLimit=$(API_BURST_LIMIT)) \
	$(if $(RUN_STAGE_MAX_CONCURRENCY),RunStageMaxConcurrency=$(RUN_STAGE_MAX_CONCURRENCY)) \
	$(if $(API_RESERVED_CONCURRENCY),ApiReservedConcurrency=$(API_RESERVED_CONCURRENCY)) \
	$(if $(RUN_MAX_OUTPUT_BYTES),RunMaxOutputBytes=$(RUN_MAX_OUTPUT_BYTES))

# The STAGE SAM template merged with infra/template.json, and the code zip, in build/package.
# No local MAOF_* setting (.env) may reach it: importing app.py reads some (the CORS origin).
package: venv
	rm -rf build/package
	env $(addprefix -u ,$(filter MAOF_%,$(.VARIABLES))) \
	AWS_DEFAULT_REGION=$(or $(REGION),$(AWS_REGION),$(AWS_DEFAULT_REGION),us-east-1) \
	$(VENV)/bin/chalice package --stage $(STAGE) --merge-template infra/template.json build/package

# The SSM SecureString parameters under /maof/$(STAGE): generates jwt-secret, secret-key and
# audit-signing-key, asks for the URLs (OVERWRITE=1 replaces those).
secrets: venv
	$(INFRA) secrets $(if $(OVERWRITE),--overwrite)

# Package, create or update the stack (aws cloudformation package + deploy), run the migrate
# function, publish the dashboard.
deploy: package
	$(INFRA) deploy $(STACK_PARAMETERS)

# Delete the stack and its artifacts (keeps the SSM parameters unless DELETE_SECRETS=1).
destroy: venv
	$(INFRA) destroy $(if $(YES),--yes) $(if $(DELETE_SECRETS),--delete-secrets)

# Rotate a key of a deployed STAGE without downtime (docs/security.md): KEY=jwt-secret or
# KEY=secret-key (the latter also re-encrypts every agent token and callback secret) or KEY=audit-signing-key (adds a
# signing key; old ones keep verifying); retire-keys drops the old one (not audit keys).
rotate-key: venv
	$(INFRA) rotate-key --key $(KEY)

retire-keys: venv
	$(INFRA) retire-keys --key $(KEY)

# Locally (or with MAOF_DATABASE_URL pointing anywhere): move agent tokens and callback
# secrets to MAOF_SECRET_KEY.
reencrypt-agent-tokens: migrate
	$(PY) -m chalicelib.agents.secrets reencrypt

# The deployed stack's outputs (API URL, dashboard URL, queues).
deploy-info: venv
	$(AWS) cloudformation describe-stacks --stack-name maof-$(STAGE) --output table \
	--query "Stacks[0].Outputs[].{Output: OutputKey, Value: OutputValue}"

# Benchmarks on the local stack, in their own database (maof_bench, recreated and migrated
# by the run), queue and Redis db; results in bench/results/. Knobs: make bench BENCH_ARGS="--help".
bench: stack
	$(PY) -m bench $(BENCH_ARGS)

down:
	@test -x $(PY) && $(PY) -m devstack.stack down || true

clean: down
	rm -rf .maof build .pytest_cache .mypy_cache .ruff_cache
