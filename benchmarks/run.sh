#!/usr/bin/env bash
# `make bench`: the throughput/memory benchmark for the machine at hand. With a GPU, issue 4's one-GPU FSDP runs on
# the Llama-3.2-1B architecture (benchmarks/gpu_fsdp_one_gpu.sh); without one, the embedded default job on the CPU.
# Record what you report in BENCHMARKS.md with the date, command, machine and versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  exec bash benchmarks/gpu_fsdp_one_gpu.sh
fi
RUN=${RUN:-/tmp/tunelab-cpu-bench}
rm -rf "$RUN"
$PY -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| threads', torch.get_num_threads())"
/usr/bin/time -f "peak RSS %M KiB, wall %e s" $PY train.py hydra.run.dir="$RUN" logger=csv callbacks.progress_bar=null \
  trainer.log_every_n_steps=1 export=false 2>&1 | grep -E "tunelab run summary|throughput|val/|peak RSS" 
$PY benchmarks/run_figures.py "$RUN"
