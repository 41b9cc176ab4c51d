# `make train` and `make test` set up whatever is missing (virtual env, package in editable mode) first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; on a GPU box use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-gpu services ui bench bench-scale-out bench-sweep bench-sweep-dispatch bench-pruning bench-cli bench-data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $@

train: install
	$(PY) train.py $(ARGS)

# Debian packages the tests' own servers need (PostgreSQL, Chromium, SLURM); a no-op when present.
services:
	bash .ci/services.sh

# Two test files at a time (most tests wait on a train.py subprocess), one thread per process: torch's default of one
# thread per core in each of them oversubscribes a 2-core machine many times over. Files go out in tests/conftest.py's
# order (the longest first), not xdist's (the most tests first).
TEST_WORKERS ?= 2
test: install services
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# On a machine with 2+ CUDA GPUs: FSDP export/resume over two ranks, sweeps of multi-GPU trials, QLoRA on a GPU
# (`make test` skips the multi-GPU ones where there are fewer GPUs).
test-gpu: install
	$(PY) -m pytest tests/test_multi_gpu.py tests/test_qlora.py $(PYTEST_ARGS)

# The UI opens on MLflow 3's GenAI home page: first print the address of the experiment's training runs.
UI_PORT ?= 5000
EXPERIMENT ?= tunelab
UI_STORE = $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}
ui: install
	@$(PY) -m tunelab.mlflow_ui --store "$(UI_STORE)" --ui http://127.0.0.1:$(UI_PORT) --experiment $(EXPERIMENT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri "$(UI_STORE)" --host 127.0.0.1 --port $(UI_PORT)

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

# Slot occupancy (issue 34): a 12-trial sweep on 2 CPU slots with lora_search's pruner, batch against asynchronous
# dispatch: wall time and how busy the slots were (about 25 minutes on 2 CPU cores).
bench-sweep-dispatch: install
	bash benchmarks/sweep_dispatch.sh

# Pruners replayed offline (issues 14, 21): 40 seeds per sampler (TPE, random, GP) x pruner on recorded validation
# curves, beside unpruned sweeps of the first 7, 10 and 14 trials (the baseline a pruner must beat at equal
# trial-steps). The curves are recorded first where benchmarks/pruning_curves.json is missing: 140 LoRA configurations
# of 150 steps on the tiny task, 7x the trials of bench-sweep's unpruned sweep (resumable: the study in
# $(CURVES_WORK) is the cache). Then the signals (issue 21): 28 configurations recorded with a cooled fork of 5 steps at
# every validation and the EMA of the weights (pruning_signal_curves.json), and with a fork of 15 steps at every 50th
# step (..._fork15.json), each replayed with the pruners fed the loss, the fork and the EMA (~10 minutes each).
CURVES_WORK ?= /tmp/tunelab-pruning-curves
SIGNAL_GRID = --jobs 2 --rank-index 1,3 --warmups 0,0.2 --signals
bench-pruning: install
	test -f benchmarks/pruning_curves.json || $(PY) benchmarks/record_curves.py --work $(CURVES_WORK)
	$(PY) benchmarks/pruning_replay.py benchmarks/pruning_curves.json --seeds 40
	test -f benchmarks/pruning_signal_curves.json || $(PY) benchmarks/record_curves.py --work $(CURVES_WORK)-signals \
	  --out benchmarks/pruning_signal_curves.json $(SIGNAL_GRID) --fork-steps 5
	test -f benchmarks/pruning_signal_curves_fork15.json || $(PY) benchmarks/record_curves.py \
	  --work $(CURVES_WORK)-fork15 --out benchmarks/pruning_signal_curves_fork15.json $(SIGNAL_GRID) --fork-steps 15 --val-every 50
	for curves in benchmarks/pruning_signal_curves.json benchmarks/pruning_signal_curves_fork15.json; do \
	  $(PY) benchmarks/pruning_replay.py $$curves --seeds 40 --samplers tpe --signals loss,cooled,ema \
	    --pruners none,nearest_bound,successive_halving,hyperband,median --pruned-trials optuna,reported || exit 1; done

# Start-up of the command line: `train.py --help` and a config error against `import lightning` (issue 13; ~1 minute).
# data.streaming=true against the cached path on a generated ~2 GB JSON-lines file (5M rows): time to the first step,
# rows/s, resident memory, disk written (issue 32; the cached path's tokenizing alone takes many minutes on 2 cores).
bench-data: install
	$(PY) benchmarks/stream_data.py

bench-cli: install
	$(PY) benchmarks/cli_startup.py

clean:
	rm -rf outputs/*/ multirun/*/ .cache
