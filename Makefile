# voxelflow — the two commands a new user needs are `make demo` and `make test`. Each first installs what a
# fresh Debian machine lacks (ci/install-system.sh: Debian packages; the .venv with the project in it), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HELM := .tools/bin/helm
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install install-system install-python install-ohif test lint lint-ruff lint-format lint-types lint-imports lint-chart
.PHONY: up down status stack-env demo bench-ingest proto proto-check

install: install-system install-python install-ohif ## everything a fresh Debian machine lacks

# Silent and instant (one dpkg-query) when everything is there; installs as root or through `sudo -n`,
# otherwise prints the one command to run as root and fails.
install-system: ## Debian packages: Orthanc + DICOMweb and PostgreSQL-index plugins (the PACS), dcmtk, PostgreSQL, Redis, python3-venv, dcm2niix, chromium
	@ci/install-system.sh

install-python: $(VENV)/.installed ## the services' virtual environment, with voxelflow itself (the `voxelflow` command)

# The project goes in editable (`pip install -e .`): .venv/bin/voxelflow then runs this checkout's code.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | install-system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The prebuilt OHIF viewer (npm @ohif/app, pinned version and integrity) in .tools/ohif: the viewer check of the
# inference service's DICOM SEG (tests/inference/test_viewer_ohif.py) opens it in headless Chromium.
install-ohif: | install-system ## the prebuilt OHIF v3 viewer for the SEG viewer test (ci/install-ohif.sh)
	@ci/install-ohif.sh

test: install ## the whole suite against real servers it starts itself
	$(PY) -m pytest -q

# Every check runs (make -k) and the summary names the ones that failed.
LINT_STEPS := lint-ruff lint-format lint-types lint-imports proto-check lint-chart
lint: install-python ## ruff, ruff format, mypy, import-linter contracts, generated protobuf code, helm lint
	@$(MAKE) --no-print-directory -k $(LINT_STEPS) || { echo "voxelflow: make lint failed (see the errors above)" >&2; exit 1; }

lint-ruff:
	$(VENV)/bin/ruff check shared services tests

lint-format:
	$(VENV)/bin/ruff format --check shared services tests

lint-types:
	$(VENV)/bin/mypy shared services

lint-imports: ## the [tool.importlinter] contracts of pyproject.toml: shared imports no service, services are independent
	$(VENV)/bin/lint-imports

lint-chart: ## helm lint --strict of charts/voxelflow (tests/deploy renders and validates it: make helm-lint)
	@VOXELFLOW_PYTHON=$(PY) ci/install-helm.sh >/dev/null
	$(HELM) lint --strict charts/voxelflow

# The local stack (PostgreSQL, Redis, SeaweedFS S3, Orthanc, MLflow) on 127.0.0.1, state in .voxelflow/stack.
# STACK_ARGS passes options through, e.g. `make up STACK_ARGS="--only postgres,redis,s3"` or "--with-services".
STACK_ARGS ?=

up: ## start the local stack and write .voxelflow/stack/stack.env
	$(PY) -m shared.stack up $(STACK_ARGS)

down: ## stop everything `make up` started
	$(PY) -m shared.stack down

status: ## each component of the local stack with its URL and state
	$(PY) -m shared.stack status

up-images: ## `make up` with every voxelflow API and worker run from its image (podman; `make images` first)
	VOXELFLOW_STACK_IMAGES=1 $(PY) -m shared.stack up --with-services $(STACK_ARGS)

stack-env: ## print the VOXELFLOW_* variables of the running stack
	$(PY) -m shared.stack env

demo: install ## the end-to-end story on the bundled data (see README)
	$(VENV)/bin/voxelflow demo $(DEMO_ARGS)

demo-images: install ## `make demo` against the services run from their images (`make images` first)
	VOXELFLOW_STACK_IMAGES=1 $(VENV)/bin/voxelflow demo $(DEMO_ARGS)

# Real images with podman (not part of `make test` or CI: a cold build takes minutes and GBs). The base image
# comes from Debian packages (mmdebstrap + podman import); IMAGES="ingest mlflow" builds only those.
.PHONY: images images-smoke up-images demo-images
IMAGES ?=
images: ## build every service image and mlflow with podman from the project's Dockerfiles (ci/build-images.sh)
	ci/build-images.sh $(IMAGES)

# SMOKE="ingest:api preprocessing:worker" (the default) picks service:process pairs to run from the images.
SMOKE ?=
images-smoke: install-python ## run built images like their pods (non-root, read-only root fs, --network host) against a private stack
	VOXELFLOW_PYTHON=$(PY) ci/smoke-images.sh $(SMOKE)

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

.PHONY: bench-preprocess
bench-preprocess: ## cases/s: cached preprocessing (first build, rerun) vs plain MONAI (private S3; out/bench-preprocess.json)
	$(PY) ci/bench_preprocess.py $(BENCH_ARGS)

# --- training (shared/training, services/training_worker) --------------------------------------------
.PHONY: bench-train
bench-train: ## the training recipe vs a plain MONAI script, same split and wall time: test Dice, curve PNG, peak memory (out/bench-train.*)
	$(PY) ci/bench_train.py $(BENCH_ARGS)

.PHONY: bench-classify
bench-classify: ## classification recipe vs plain MONAI DenseNet121, same split and wall time: test AUC + DeLong CI, sens/spec, ECE, paired DeLong p (out/bench-classify.json)
	$(PY) ci/bench_classify.py $(BENCH_ARGS)

# --- end training ------------------------------------------------------------------------------------

# ---- inference: the Triton environment and the inference benchmark (docs/inference-backends.md) ----------
TRITON_VENV ?= .venv-triton
.PHONY: install-triton bench-inference

install-triton: $(TRITON_VENV)/.installed ## tritonserver (nvidia-pytriton, CPU) + onnxruntime + numpy<2 in .venv-triton

$(TRITON_VENV)/.installed: requirements-triton.txt | install-system
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.txt
	touch $@

# the test suite starts a real tritonserver from .venv-triton
install-python: install-triton

bench-inference: install-python ## p50/p99 + volumes/s: Triton vs embedded ONNX Runtime vs MONAI in PyTorch
	$(PY) ci/bench_inference.py $(BENCH_ARGS)
# ---- end inference --------------------------------------------------------------------------------------

# ---- model registry and evaluation (branch registry) -------------------------------------------------
.PHONY: evaluate
# make evaluate MODEL=models:/hippocampus@champion DATA=../shared/data/msd_task04_hippocampus OUT=out/eval.csv
evaluate: ## metrics of a registered model on an MSD folder (needs VOXELFLOW_MLFLOW_TRACKING_URI)
	$(VENV)/bin/voxelflow evaluate --model $(MODEL) --data $(DATA) $(if $(OUT),--out $(OUT))
# ---- end model registry ---------------------------------------------------------------------------------

# ---- model export for serving (branch infer-wire) ------------------------------------------------------
.PHONY: export-model
# make export-model MODEL=models:/hippocampus/3 CASES=../shared/data/msd_task04_hippocampus
export-model: ## ONNX + TorchScript of a registry version through the parity gate, attached, Triton repo in storage
	$(VENV)/bin/voxelflow models export --model $(MODEL) $(if $(CASES),--cases $(CASES))

# ---- end model export -----------------------------------------------------------------------------------

.PHONY: compare-training
# make compare-training DATASET=ds-… [COMPARE_ARGS="--rounds 10 --local-epochs 2"] (after make demo)
compare-training: ## FedAvg over the stack's sites vs the centralised baseline: test-split Dice side by side
	$(PY) ci/federated_vs_centralised.py --dataset $(DATASET) $(COMPARE_ARGS)
