#!/usr/bin/env bash
# Issue 12, part 1: where a 4-GPU DDP LoRA run turns NaN. Runs the issue's settings through the per-rank probe
# (benchmarks/probes/ddp_probe_train.py) on every GPU with DDP and on one GPU, and packs each rank's per-step record into
# $OUT/probe-$TAG.tar.gz. EXTRA=+trainer.detect_anomaly=true names the first backward op to return NaN;
# PROBE_DUMP_STEP=10 saves each rank's batch and adapters as step 10 starts, and replays them on one GPU. ONLY="ddp_none one_none ddp_auto" picks runs; EXTRA adds overrides to each.
source "$(dirname "$0")/../gpu_runs.sh"   # OUT, RUNS, PY, env.txt, want
N=${GPUS:-$(nvidia-smi -L | wc -l)}
COMMON="model=llama1b model.init=random model.tokenizer=char data=random_tokens precision=bf16_true peft=lora
  logger=csv callbacks.early_stopping=null callbacks.progress_bar=null callbacks.divergence=null
  callbacks.model_checkpoint=null export=false trainer.max_steps=30 trainer.val_check_interval=30
  trainer.log_every_n_steps=1 ${EXTRA:-}"
probe() {
  local name=$1; shift
  want "$name" || return 0
  echo "=== $name: $*" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  PROBE_DIR=$RUNS/probe/$name timeout 300 $PY benchmarks/probes/ddp_probe_train.py $COMMON hydra.run.dir=$RUNS/$name "$@" >> "$OUT/log.txt" 2>&1
  echo "exit $? for $name after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  cp $RUNS/$name/csv/version_0/metrics.csv $RUNS/probe/$name/ 2>/dev/null
}
PROBE_ACTIVATIONS=1 probe ddp_none strategy=ddp trainer.devices=$N kernels=none
PROBE_ACTIVATIONS=1 probe one_none trainer.devices=1 kernels=none
probe ddp_auto strategy=ddp trainer.devices=$N
tar -czf "$OUT/probe-${TAG:-all}.tar.gz" --exclude="*.pt" -C $RUNS probe  # the dumps: replayed here
# With PROBE_DUMP_STEP: each rank's dumped step of the DDP run replayed on one GPU, per attention variant, the first in
# anomaly mode (benchmarks/probes/replay_rank_step.py).
if [ -n "${PROBE_DUMP_STEP:-}" ] && want ddp_none; then
  CUDA_VISIBLE_DEVICES=0 timeout 240 $PY benchmarks/probes/replay_rank_step.py $RUNS/probe/ddp_none/rank*_step$PROBE_DUMP_STEP.pt \
    $COMMON trainer.devices=1 kernels=none > "$OUT/replay.txt" 2>&1
  echo "replay exit $?" | tee -a "$OUT/log.txt"; grep -E "^(==|####|frozen|   )" "$OUT/replay.txt"
fi
