# voxelflow — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install install-system install-python test lint up down status stack-env demo bench-ingest proto proto-check

install: install-system install-python ## everything a fresh Debian machine lacks

install-system: ## Debian packages: Orthanc + DICOMweb plugin (the PACS), dcmtk, PostgreSQL, Redis
	ci/install-system.sh

install-python: $(VENV)/.installed ## the services' virtual environment

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: install-python ## the whole suite against real servers it starts itself
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check shared services tests
	$(VENV)/bin/ruff format --check shared services tests
	$(VENV)/bin/mypy shared services

# The local stack (PostgreSQL, Redis, SeaweedFS S3, Orthanc, MLflow) on 127.0.0.1, state in .voxelflow/stack.
# STACK_ARGS passes options through, e.g. `make up STACK_ARGS="--only postgres,redis,s3"` or "--with-services".
STACK_ARGS ?=

up: ## start the local stack and write .voxelflow/stack/stack.env
	$(PY) -m shared.stack up $(STACK_ARGS)

down: ## stop everything `make up` started
	$(PY) -m shared.stack down

status: ## each component of the local stack with its URL and state
	$(PY) -m shared.stack status

stack-env: ## print the VOXELFLOW_* variables of the running stack
	$(PY) -m shared.stack env

demo: install-python ## the end-to-end story on the bundled data (see README)
	$(PY) -m shared.demo

.PHONY: helm-lint k8s
helm-lint: ## Helm chart: lint + render + strict schema validation + invariants (tests/deploy)
	ci/install-helm.sh
	$(PY) -m pytest -q tests/deploy

k8s: ## regenerate the plain manifests in k8s/ from the Helm chart
	ci/install-helm.sh
	VOXELFLOW_PYTHON=$(PY) k8s/render.sh

bench-ingest: ## STOW-RS throughput of the ingest API vs Orthanc (private stack; out/bench-ingest.json)
	$(PY) ci/bench_ingest.py $(BENCH_ARGS)

proto: ## regenerate shared/proto from proto/voxelflow/v1/*.proto
	PYTHON=$(PY) ci/generate-proto.sh

proto-check: ## fail if the committed generated code differs from a fresh generation
	tmp=$$(mktemp -d) && PYTHON=$(PY) ci/generate-proto.sh $$tmp && diff -r -x __init__.py -x __pycache__ $$tmp/voxelflow shared/proto/voxelflow && rm -rf $$tmp
