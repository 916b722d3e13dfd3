# trainyard: `make run` trains the default digits run, `make test` runs the test suite,
# `make bench` runs the benchmarks (threads/processes/DataLoader/torchrun vs Ray, AMP, MLflow).
# Each creates .venv on first use and installs the project into it.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# torch is installed before the project so that pip never resolves a bare `torch` to a multi-GB
# CUDA build by accident. Without an NVIDIA driver the CPU build is taken (its `+cpu` version tag
# exists only on PyTorch's CPU index, never on PyPI). With one, TORCH_GPU is installed; set it to
# pick your CUDA build, e.g. TORCH_GPU="torch --index-url https://download.pytorch.org/whl/cu128".
# A torch already installed in .venv is kept as it is.
TORCH_CPU       ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_GPU       ?= torch==2.13.0

CONFIG ?= configs/digits.yaml

.PHONY: setup run test bench gpu-kit lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "NVIDIA GPU found: installing $(TORCH_GPU)"; \
	    $(BIN)/pip install $(TORCH_GPU); \
	  else \
	    echo "No GPU found: installing the CPU build $(TORCH_CPU)"; \
	    $(BIN)/pip install --retries 1 "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); \
	  fi; \
	fi
	@# (the gpu extra: MLflow's GPU system metrics, where nvidia-smi finds a GPU)
	$(BIN)/pip install -e ".[dev$$(command -v nvidia-smi >/dev/null 2>&1 && echo ,gpu)]"
	@# Ray 2.60's clients (ray job submit, ray status) talk to a `ray start --head` cluster,
	@# which has token authentication on, only when told so: the activated venv tells them.
	@grep -q RAY_AUTH_MODE $(BIN)/activate || \
	  printf '\n# trainyard: Ray clients send the cluster token\nexport RAY_AUTH_MODE=token\n' >> $(BIN)/activate
	@touch $@

run: setup
	$(BIN)/trainyard train $(CONFIG)

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/trainyard bench all

# What .ci/gpu-check carries to a GPU machine that has torch but no Ray, MLflow, pytest, Pillow
# or scikit-learn (../shared/gpu/README.md): the wheel kit, pytest's and Pillow's wheels, digits
# as a CSV and as PNG files in class folders.
gpu-kit: setup
	../shared/gpu/make-kit
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp -d .gpu-kit/wheels pytest pluggy iniconfig pygments pytest-timeout pillow
	@mkdir -p data
	$(BIN)/python -c "from sklearn.datasets import load_digits; \
	  load_digits(as_frame=True).frame.rename(columns={'target': 'label'}).to_csv('data/digits.csv', index=False)"
	TRAINYARD_CACHE=data $(BIN)/python -c "from trainyard.pipelines.data.images.files import digits_images; digits_images()"

# lint-imports reads trainyard.cluster, .models and .pipelines as top-level packages, which
# they are not once installed: `trainyard` (pipelines/trainyard/, the Python API) is a regular
# package above them. It reads them through a `trainyard` namespace of links instead.
LINT_ROOT := $(VENV)/lint-root

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p $(LINT_ROOT)/trainyard
	@for p in cluster models pipelines; do ln -sfn $(CURDIR)/$$p $(LINT_ROOT)/trainyard/$$p; done
	PYTHONPATH=$(LINT_ROOT) $(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf results mlartifacts mlflow.db .pytest_cache
