# `make test` and `make demo` work on a fresh machine: they create .venv and build the Kubernetes
# control plane (tools/kube/build.sh: Go modules only, cached outside the repo) themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# PyPI's torch 2.13.0 (a CUDA build, ~530 MB wheel, ~4.7 GB venv; it computes on the CPU here),
# pinned in every install step: a resolve without the pin takes the newest allowed (2.14.x).
TORCH := torch==2.13.0

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler: built once per version into
# ~/.cache/loraresume/kube (LORARESUME_KUBE_CACHE), progress on stderr; prints the bin directory.
KUBE_BUILD := tools/kube/build.sh
KUBE_ENV = LORARESUME_KUBE_BIN="$$($(KUBE_BUILD))"

# gofakes3, an S3-compatible server in Go (tools/s3/build.sh: cached the same way, ~30 s the first
# time), for tests/sandbox/test_s3_server_compat.py and `benchmarks/scale.py --s3-server go`.
S3_BUILD := tools/s3/build.sh
S3_ENV = LORARESUME_S3_SERVER="$$($(S3_BUILD))"

.PHONY: venv kube s3 lint test test-fast demo docs crds clean

venv: $(STAMP)

$(STAMP): pyproject.toml sandbox/pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) -e '.[trainer,operator,test]' -e ./sandbox
	# (unsloth pulls torchvision 0.28.0, the build matching PyPI's torch 2.13.0: it imports, so it
	# stays; docs/development.md)
	touch $(STAMP)

kube:
	$(KUBE_BUILD) >/dev/null

s3:
	$(S3_BUILD) >/dev/null

# ruff (lint rules, formatting), import-linter (the layering contracts) and mypy (types), as
# configured in pyproject.toml; the pre-commit hooks run the same.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# In parallel (pytest-xdist), one test file per worker at a time: a file's module-scoped control
# plane is started once. TEST_WORKERS=1 runs serially.
TEST_WORKERS ?= 2
test: lint kube s3
	$(KUBE_ENV) $(S3_ENV) $(BIN)/python -m pytest -q -ra --durations=15 $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Unit and integration tests only (no trainer subprocesses).
test-fast: $(STAMP) kube s3
	$(KUBE_ENV) $(S3_ENV) $(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP) kube
	$(KUBE_ENV) $(BIN)/python -m loraresume_sandbox.demo

clean:
	rm -rf $(VENV) .pytest_cache

docs: $(STAMP)
	$(BIN)/python -m loraresume_trainer.config_docs > docs/job-config.md

# The CRD is generated from the operator's spec model; tests/operator/test_crd.py fails when it is stale.
CRD_FILE := crds/loraresume.dev_loraresumes.yaml
crds: $(STAMP)  # the CRD, and the Helm chart's byte-identical copy; written only when generation succeeds
	$(BIN)/python -m loraresume_operator.crd > $(CRD_FILE).tmp && mv $(CRD_FILE).tmp $(CRD_FILE)
	cp $(CRD_FILE) helm/loraresume-operator/files/loraresume.dev_loraresumes.yaml
