#!/usr/bin/env bash
# Smoke runs of the embedded tiny model on 2 GPUs over NCCL (DDP, FSDP sharded and resumed, FSDP full + gathered
# export, LoRA export), each watched: a run still going after its limit has every process dump its Python stacks
# (faulthandler on SIGABRT) into $OUT/<name>.log and is killed, so a hang shows where it hangs.
# Usage: OUT=dir bash benchmarks/gpu_smoke.sh (ONLY="fsdp2 fsdp2_resumed" runs a subset; DIR=path runs into that dir
# rather than /tmp/r/<name>).
OUT=${OUT:-smoke_out}; mkdir -p "$OUT"
export PYTHONFAULTHANDLER=1 PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TUNELAB_CACHE=/tmp/tunelab_cache
export MLFLOW_TRACKING_URI=sqlite:////tmp/smoke_ml.db NCCL_DEBUG=WARN
watched_run() {
  local name=$1 limit=$2; shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local dir="${DIR:-/tmp/r/$name}" start=$SECONDS
  # timeout signals its whole process group: the run and every rank Lightning started from it.
  timeout -s ABRT -k 10 "$limit" python3 train.py "$@" hydra.run.dir="$dir" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "HANG $name after $((SECONDS - start)) s"
  else echo "done $name in $((SECONDS - start)) s, exit $rc"; fi
  grep -E "Error|error|Traceback|File \"/work|File \"/tmp|line [0-9]+ in" "$OUT/$name.log" | grep -v "site-packages/torch/_dynamo" | head -40 | cut -c1-220
  ls "$dir" 2>/dev/null | tr '\n' ' '; echo
}
S="trainer.max_steps=10 trainer.val_check_interval=10 data.num_examples=400 callbacks.progress_bar=null callbacks.early_stopping=null"
watched_run ddp2 60 $S strategy=ddp trainer.devices=2 export=false
F="strategy=fsdp trainer.devices=2 export=false optim.total_steps=20 logger=csv"
watched_run fsdp2 120 $S $F
watched_run fsdp2_resumed 100 $S $F trainer.max_steps=20 trainer.val_check_interval=20 ckpt_path=/tmp/r/fsdp2/checkpoints/last.ckpt
DIR=/tmp/r/fsdp2 watched_run fsdp2_again 100 $S $F trainer.max_steps=20 trainer.val_check_interval=20 ckpt_path=last
watched_run fsdp2_full_export 60 $S strategy=fsdp trainer.devices=2 precision=bf16_true strategy.state_dict_type=full
watched_run fsdp2_lora_export 90 $S strategy=fsdp trainer.devices=2 peft=lora precision=bf16_true
if [ -d /tmp/r/fsdp2_lora_export/export ]; then  # which adapter keys the gathered export holds
  python3 -c "import sys, safetensors.torch as s; k = sorted(s.load_file(sys.argv[1])); print(len(k), k[:3])" \
    /tmp/r/fsdp2_lora_export/export/adapter_model.safetensors
fi
