"""Optuna study sweeps (`train.py -m sweep=...`).

- `sweeper`: the Hydra sweeper; asks trials, launches them, tells their outcome (the sweep process).
- `space`: what the sweep searches, read and checked once before any trial.
- `recovery`: the trials of dead workers, failed and run again from their checkpoint; the heartbeat.
- `summary`: the sweep's results file and printed summary.
- `trial`: the job side; a training run re-opens its trial to report validations and be pruned.
- `signals`: what a trial reports at a validation besides its loss: a cooled-down fork, averaged weights.
- `storage`: the Optuna storage the study lives in, and whether a trial's worker process is gone.
- `tracking`: the study in MLflow, one parent run with each trial's run nested under it.
"""
