#!/usr/bin/env bash
# Issue 4's GPU check on one GPU: FSDP (1 device), llama1b architecture, random init, bf16-true, batch 4 x 2048,
# full fine-tune and LoRA, each written as a sharded checkpoint and resumed. Figures go to $OUT (or ./bench_out).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; RUNS=${RUNS:-/tmp/tunelab_runs}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TUNELAB_CACHE=/tmp/tunelab_cache MLFLOW_TRACKING_URI=sqlite:////tmp/tunelab_ml.db
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, lightning, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)"
} | tee "$OUT/env.txt"
COMMON="model=llama1b model.init=random model.tokenizer=char data=random_tokens precision=bf16_true strategy=fsdp
  trainer.devices=1 trainer.log_every_n_steps=1 logger=csv callbacks.progress_bar=null callbacks.early_stopping=null
  callbacks.model_checkpoint.save_top_k=0 export=false"
run_one() {
  local name=$1; shift
  echo "=== $name: python train.py $COMMON $*" | tr -s ' \n' ' ' | tee -a "$OUT/log.txt"; echo | tee -a "$OUT/log.txt"
  timeout 240 $PY train.py $COMMON hydra.run.dir=$RUNS/$name "$@" >> "$OUT/log.txt" 2>&1
  echo "exit $? for $name" | tee -a "$OUT/log.txt"
  $PY benchmarks/run_figures.py $RUNS/$name | tee -a "$OUT/figures.jsonl"
}
# ONLY="lora lora_resumed" runs a subset.
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() { want "$1" && run_one "$@"; }
run full trainer.max_steps=40 trainer.val_check_interval=40
run full_resumed trainer.max_steps=50 trainer.val_check_interval=50 ckpt_path=$RUNS/full/checkpoints/last.ckpt
run lora peft=lora trainer.max_steps=40 trainer.val_check_interval=40
run lora_resumed peft=lora trainer.max_steps=50 trainer.val_check_interval=50 ckpt_path=$RUNS/lora/checkpoints/last.ckpt
run full_activation_checkpointing strategy.activation_checkpointing=true trainer.max_steps=30 trainer.val_check_interval=30
ls -la $RUNS/*/checkpoints/ | tee -a "$OUT/log.txt"
