# `make train` and `make test` set up whatever is missing (virtual env, package in editable mode) first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; on a GPU box use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-gpu services ui bench bench-scale-out bench-sweep clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $@

train: install
	$(PY) train.py $(ARGS)

# Debian packages the tests' own servers need (PostgreSQL, Chromium); a no-op when present.
services:
	bash .ci/services.sh

test: install services
	$(PY) -m pytest $(PYTEST_ARGS)

# On a machine with 2+ CUDA GPUs: FSDP export/resume over two ranks, sweeps of multi-GPU trials, QLoRA on a GPU
# (`make test` skips the multi-GPU ones where there are fewer GPUs).
test-gpu: install
	$(PY) -m pytest tests/test_multi_gpu.py tests/test_qlora.py $(PYTEST_ARGS)

UI_PORT ?= 5000
ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} --host 127.0.0.1 --port $(UI_PORT)

# Throughput and memory on this machine (one GPU: the fast path against hand-written loops on the Llama-3.2-1B
# architecture, benchmarks/gpu_fast_path.sh; CPU: the default job).
bench: install
	bash benchmarks/run.sh

# GPU scaling: FSDP / DDP+LoRA on every GPU against one GPU, checkpoints resumed, QLoRA (BENCHMARKS.md).
bench-scale-out: install
	bash benchmarks/gpu_scale_out.sh

# Sweep efficiency on the embedded task: 20 trials without and with pruning (about 15 minutes on 2 CPU cores).
bench-sweep: install
	bash benchmarks/sweep_efficiency.sh

clean:
	rm -rf outputs/*/ multirun/*/ .cache
