#!/usr/bin/env bash
# `make bench`: the throughput/memory benchmark for the machine at hand. With GPUs, the Llama-3.2-1B architecture
# (gpu_scale_out.sh on 2+; on one, gpu_fast_path.sh: tunelab against hand-written loops, fixed and real-length data,
# FP8, Llama-3.1-8B LoRA; then gpu_fsdp_one_gpu.sh);
# without one, the embedded default job on the CPU.
# Record what you report in BENCHMARKS.md with the date, command, machine and versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  # Two GPUs or more: every GPU against one (benchmarks/gpu_scale_out.sh, with QLoRA); one GPU: the fast path (FP8
  # and Llama-3.1-8B included), then FSDP2 on one device against FSDP1 and the auto path.
  [ "$(nvidia-smi -L | wc -l)" -gt 1 ] && exec bash benchmarks/gpu_scale_out.sh
  bash benchmarks/gpu_fast_path.sh
  exec bash benchmarks/gpu_fsdp_one_gpu.sh
fi
RUN=${RUN:-/tmp/tunelab-cpu-bench}
rm -rf "$RUN"
$PY -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| threads', torch.get_num_threads())"
/usr/bin/time -f "peak RSS %M KiB, wall %e s" $PY train.py hydra.run.dir="$RUN" logger=csv callbacks.progress_bar=null \
  trainer.log_every_n_steps=1 export=false 2>&1 | grep -E "tunelab run summary|throughput|val/|peak RSS" 
$PY benchmarks/run_figures.py "$RUN"
