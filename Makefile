# `make test` and `make demo` work on a fresh machine: they create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch first, from the local CPU build: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: venv test test-fast demo docs crds clean

venv: $(STAMP)

$(STAMP): pyproject.toml sandbox/pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) -e '.[trainer,operator,test]' -e ./sandbox
	# unsloth pulls PyPI's torchvision, a CUDA build that breaks `import unsloth` beside the
	# CPU torch; the text-only pipeline does not need it (notes/training-stack.md).
	$(BIN)/pip uninstall -y -q torchvision
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

# Unit and integration tests only (no trainer subprocesses).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m loraresume_sandbox.demo

clean:
	rm -rf $(VENV) .pytest_cache

docs: $(STAMP)
	$(BIN)/python -m loraresume_trainer.config_docs > docs/job-config.md

# The CRD is generated from the operator's spec model; tests/operator/test_crd.py fails when it is stale.
CRD_FILE := crds/loraresume.dev_loraresumes.yaml
crds: $(STAMP)  # the CRD, and the Helm chart's byte-identical copy; written only when generation succeeds
	$(BIN)/python -m loraresume_operator.crd > $(CRD_FILE).tmp && mv $(CRD_FILE).tmp $(CRD_FILE)
	cp $(CRD_FILE) helm/loraresume-operator/files/loraresume.dev_loraresumes.yaml
