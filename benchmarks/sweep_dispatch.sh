#!/usr/bin/env bash
# Slot occupancy of a sweep (issue 34): the same 12-trial LoRA sweep on 2 CPU slots (hydra/launcher=torchrun, n_jobs=2),
# lora_search's own pruner, the same sampler seed, once with dispatch=batch (2 trials asked together, the next 2 once
# both have ended) and once with dispatch=async (the next trial started the moment one ends).
# The base: the tiny model fine-tuned for BASE_STEPS (150; sweep_efficiency.sh's 400 took most of an hour on 2 shared
# cores), without benchmark evaluation; each trial a LoRA of 150 steps on it.
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

[ -f "$WORK/base/export/config.json" ] || $PY train.py hydra.run.dir=$WORK/base trainer.max_steps=${BASE_STEPS:-150} \
    logger=none eval=none callbacks.progress_bar=null > "$WORK/base.log" 2>&1
for mode in $MODES; do
  [ -f "$WORK/multirun-$mode/optimization_results.yaml" ] && continue
  /usr/bin/time -f "%e" -o "$WORK/$mode.seconds" $PY train.py -m sweep=lora_search hydra/launcher=torchrun \
    hydra.sweeper.n_jobs=2 hydra.sweeper.dispatch=$mode hydra.sweeper.n_trials=12 hydra.sweeper.study_name=dispatch-$mode \
    hydra.sweeper.storage=sqlite:///$WORK/optuna.db hydra.sweep.dir=$WORK/multirun-$mode hydra.sweeper.sampler.seed=$SEED \
    model.name_or_path=$WORK/base/export model.init=pretrained model.tokenizer=null trainer.max_steps=150 \
    trainer.val_check_interval=25 callbacks=none export=false eval=none logger=none > "$WORK/$mode.log" 2>&1
done
$PY benchmarks/dispatch_table.py "$WORK" $MODES
