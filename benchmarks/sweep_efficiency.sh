#!/usr/bin/env bash
# Sweep efficiency on the embedded task: the same 20-trial TPE LoRA sweep without and with pruning.
# A LoRA sweep needs a base that already knows something, so step 1 fine-tunes the tiny model (the user's own flow:
# fine-tune, export, then search adapters on top); step 2 runs `sweep=lora_search` on that export once per pruner.
# Usage: bash benchmarks/sweep_efficiency.sh [workdir] [pruner ...]   (default pruners: none nearest_bound)
# SEED=N seeds the sampler; EXTRA="key=value ..." adds overrides to every sweep (e.g. the signal and its callback). LOGGER=mlflow logs every trial to $workdir/mlflow.db, each sweep nested under its parent
# run, side by side in the UI (`mlflow ui --backend-store-uri sqlite:///$workdir/mlflow.db`); the default, none,
# measures the sweeps alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/tunelab-sweep-bench}; shift || true
PRUNERS=${*:-none nearest_bound}
LOGGER=${LOGGER:-none}
SEED=${SEED:-1234}        # the sampler's seed (trial k draws with SEED + k), the same for every pruner
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK"
export TUNELAB_CACHE=$WORK/cache MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db PYTHONUNBUFFERED=1

[ -f "$WORK/base/export/config.json" ] || $PY train.py hydra.run.dir=$WORK/base trainer.max_steps=400 \
    logger=none callbacks.progress_bar=null > "$WORK/base.log" 2>&1
for pruner in $PRUNERS; do
  [ -f "$WORK/multirun-$pruner/optimization_results.yaml" ] && continue
  /usr/bin/time -f "%e" -o "$WORK/$pruner.seconds" $PY train.py -m sweep=lora_search hydra.sweeper.n_trials=20 \
    hydra.sweeper.study_name=bench-$pruner hydra.sweeper.storage=sqlite:///$WORK/optuna.db hydra/sweeper/pruner=$pruner \
    hydra.sweep.dir=$WORK/multirun-$pruner model.name_or_path=$WORK/base/export model.init=pretrained \
    hydra.sweeper.sampler.seed=$SEED model.tokenizer=null trainer.max_steps=150 trainer.val_check_interval=25 callbacks=none export=false eval=none logger=$LOGGER ${EXTRA:-} \
    > "$WORK/$pruner.log" 2>&1
done
$PY benchmarks/sweep_table.py "$WORK" $PRUNERS
