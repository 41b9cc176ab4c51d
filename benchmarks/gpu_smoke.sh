#!/usr/bin/env bash
# Smoke runs of the embedded tiny model on 2 GPUs over NCCL (DDP, FSDP sharded, FSDP full + gathered export), each
# watched: a run still going after its limit has every process dump its Python stacks (faulthandler on SIGABRT)
# into $OUT/<name>.log and is killed, so a hang shows where it hangs. Usage: OUT=dir bash benchmarks/gpu_smoke.sh
OUT=${OUT:-smoke_out}; mkdir -p "$OUT"
export PYTHONFAULTHANDLER=1 PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TUNELAB_CACHE=/tmp/tunelab_cache
export MLFLOW_TRACKING_URI=sqlite:////tmp/smoke_ml.db NCCL_DEBUG=WARN
watched_run() {
  local name=$1 limit=$2; shift 2
  local tag="/tmp/r/$name"
  python3 train.py "$@" hydra.run.dir=$tag > "$OUT/$name.log" 2>&1 &
  local pid=$! i
  for ((i = 0; i < limit; i++)); do sleep 1; pgrep -f "$tag" > /dev/null || break; done
  if pgrep -f "$tag" > /dev/null; then
    echo "HANG $name after $i s"; pkill -ABRT -f "$tag"; sleep 4; pkill -9 -f "$tag"; sleep 1
  else
    wait $pid; echo "done $name in $i s, exit $?"
  fi
  grep -E "Error|error|Traceback|HANG|File \"/work|File \"/tmp|line [0-9]+ in" "$OUT/$name.log" | grep -v "site-packages/torch/_dynamo" | head -40 | cut -c1-220
  ls $tag 2>/dev/null | tr '\n' ' '; echo
}
S="trainer.max_steps=10 trainer.val_check_interval=10 data.num_examples=400 callbacks.progress_bar=null callbacks.early_stopping=null"
watched_run ddp2 60 $S strategy=ddp trainer.devices=2 export=false
watched_run fsdp2 60 $S strategy=fsdp trainer.devices=2 export=false
watched_run fsdp2_full_export 60 $S strategy=fsdp trainer.devices=2 precision=bf16_true strategy.state_dict_type=full
watched_run fsdp2_lora_export 60 $S strategy=fsdp trainer.devices=2 peft=lora precision=bf16_true
