"""Optuna study sweeps (`train.py -m sweep=...`).

- `sweeper`: the Hydra sweeper; asks trials, launches them, tells their outcome (the sweep process).
- `trial`: the job side; a training run re-opens its trial to report validations and be pruned.
- `storage`: the Optuna storage the study lives in, and whether a trial's worker process is gone.
- `tracking`: the study in MLflow, one parent run with each trial's run nested under it.
"""
