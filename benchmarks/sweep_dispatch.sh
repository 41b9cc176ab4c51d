#!/usr/bin/env bash
# Slot occupancy of a sweep (issue 34): the same 12-trial LoRA sweep on 2 CPU slots (hydra/launcher=torchrun, n_jobs=2),
# lora_search's own pruner, the same sampler seed, once with dispatch=batch (2 trials asked together, the next 2 once
# both have ended) and once with dispatch=async (the next trial started the moment one ends).
# The base: the tiny model fine-tuned for BASE_STEPS (150; sweep_efficiency.sh's 400 took most of an hour on 2 shared
# cores; 0: the embedded tiny model as it is), without benchmark evaluation; each trial a LoRA of STEPS (150) steps
# on it, validated every STEPS/6 (the pruner's rungs).
# Usage: bash benchmarks/sweep_dispatch.sh [workdir] [dispatch ...]   (default: batch async)
# No OMP_NUM_THREADS: the launcher gives each trial its share of the cores (2 cores / 2 slots = 1 thread).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/tunelab-dispatch-bench}; shift || true
MODES=${*:-batch async}
SEED=${SEED:-1234}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK"
export TUNELAB_CACHE=$WORK/cache PYTHONUNBUFFERED=1

BASE_STEPS=${BASE_STEPS:-150}
STEPS=${STEPS:-150}
BASE=()
if [ "$BASE_STEPS" -gt 0 ]; then
  [ -f "$WORK/base/export/config.json" ] || $PY train.py hydra.run.dir=$WORK/base trainer.max_steps=$BASE_STEPS \
      logger=none eval=none callbacks.progress_bar=null > "$WORK/base.log" 2>&1
  BASE=(model.name_or_path=$WORK/base/export model.init=pretrained model.tokenizer=null)
fi
for mode in $MODES; do
  [ -f "$WORK/multirun-$mode/optimization_results.yaml" ] && continue
  start=$EPOCHREALTIME
  $PY train.py -m sweep=lora_search hydra/launcher=torchrun \
    hydra.sweeper.n_jobs=2 hydra.sweeper.dispatch=$mode hydra.sweeper.n_trials=12 hydra.sweeper.study_name=dispatch-$mode \
    hydra.sweeper.storage=sqlite:///$WORK/optuna.db hydra.sweep.dir=$WORK/multirun-$mode hydra.sweeper.sampler.seed=$SEED \
    "${BASE[@]}" trainer.max_steps=$STEPS trainer.val_check_interval=$((STEPS / 6)) callbacks=none export=false \
    eval=none logger=none > "$WORK/$mode.log" 2>&1
  $PY -c "print(round($EPOCHREALTIME - $start, 1))" > "$WORK/$mode.seconds"
done
$PY benchmarks/dispatch_table.py "$WORK" $MODES
