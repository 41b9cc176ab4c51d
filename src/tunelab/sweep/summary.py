"""The end of a study sweep: optimization_results.yaml in the sweep dir, the best trial in MLflow, and a summary
printed for the person who started it."""

from collections import Counter
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from tunelab.sweep.storage import public_location


def summary(sweeper, study: optuna.Study, counted: list, n_trials: int) -> dict:
    """`counted`: the trials that use up n_trials (StudyLoop.counted)."""
    summary = {
        "study_name": study.study_name,
        "storage": public_location(sweeper.storage),
        "objective": f"{sweeper.config.objective.metric} ({sweeper.objective_mode()})",
        "n_trials": n_trials,
        "trials": dict(Counter(t.state.name for t in counted)),
        "best_trial": None, "best_value": None, "best_params": {},
    }
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return summary


def report(sweeper, study: optuna.Study, summary: dict, run_log) -> None:
    path = Path(sweeper.config.hydra.sweep.dir) / "optimization_results.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(summary), path)
    if run_log is not None:
        run_log.record_best(study, summary)
    params = ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()) or "-"
    best = "-" if summary["best_value"] is None else f"{summary['best_value']:.6g} (trial {summary['best_trial']})"
    lines = [
        f"study        {summary['study_name']}  ({summary['storage']})",
        f"trials       {summary['trials']} of n_trials={summary['n_trials']}",
        f"best value   {best}  {summary['objective']}",
        f"best params  {params}",
        f"results      {path}",
    ]
    if run_log is not None:
        lines.append(f"MLflow run   {run_log.run_id}  (parent of the trials' runs)")
    print("\n".join(["", "── tunelab sweep summary " + "─" * 38, *lines, ""]), flush=True)
