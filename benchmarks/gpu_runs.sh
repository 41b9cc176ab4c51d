# Sourced by the GPU benchmark scripts: where output goes, the environment line, and `run NAME overrides...`, which
# runs `train.py $COMMON overrides...` into $RUNS/NAME (skipped unless NAME is in $ONLY, when ONLY is set) and appends
# its figures (benchmarks/run_figures.py) to $OUT/figures.jsonl. The caller sets COMMON.
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; RUNS=${RUNS:-/tmp/tunelab_runs}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TUNELAB_CACHE=/tmp/tunelab_cache MLFLOW_TRACKING_URI=sqlite:////tmp/tunelab_ml.db
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, lightning, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)"
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null
} | tee "$OUT/env.txt"
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() {
  local name=$1; shift
  want "$name" || return 0
  echo "=== $name: python train.py $COMMON $*" | tr -s ' \n' ' ' | tee -a "$OUT/log.txt"; echo | tee -a "$OUT/log.txt"
  local start=$SECONDS
  timeout 300 $PY train.py $COMMON hydra.run.dir=$RUNS/$name "$@" >> "$OUT/log.txt" 2>&1
  echo "exit $? for $name after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  $PY benchmarks/run_figures.py $RUNS/$name | tee -a "$OUT/figures.jsonl"
  # Every run's metrics so far, in one file that comes back even if a later run outlasts the call.
  tar czf "$OUT/curves.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d */csv/version_*/metrics.csv) 2>/dev/null
}
