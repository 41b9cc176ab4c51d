"""The end of a study sweep: optimization_results.yaml in the sweep dir, the best trial in MLflow, and a summary
printed for the person who started it."""

from collections import Counter
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from tunelab.sweep.storage import public_location
from tunelab.sweep.trial import ENDED_ATTR, STARTED_ATTR


def summary(sweeper, study: optuna.Study, counted: list, n_trials: int, ran: list, slots: int) -> dict:
    """`counted`: the trials that use up n_trials (StudyLoop.counted); `ran`: those this sweep process ran, on
    `slots` slots."""
    summary = {
        "study_name": study.study_name,
        "storage": public_location(sweeper.storage),
        "objective": f"{sweeper.config.objective.metric} ({sweeper.objective_mode()})",
        "n_trials": n_trials,
        "trials": dict(Counter(t.state.name for t in counted)),
        "best_trial": None, "best_value": None, "best_params": {},
        "slots": slots, "occupancy": None,
    }
    if busy := slot_occupancy(ran, slots):
        summary.update(occupancy=round(busy[0], 3), wall_s=round(busy[1], 1))
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return summary


def slot_occupancy(trials: list, slots: int) -> tuple[float, float] | None:
    """(busy slot-seconds / (slots x wall), wall) over `trials`, each busy from its start to its end as it recorded
    them (tunelab.sweep.trial: its process's start, its training's end); the wall runs from the first start to the
    last end. Trials that recorded no end (failed, lost) are left out. None where no trial recorded both."""
    spans = [(t.user_attrs[STARTED_ATTR], t.user_attrs[ENDED_ATTR]) for t in trials
             if STARTED_ATTR in t.user_attrs and ENDED_ATTR in t.user_attrs]
    wall = max((end for _, end in spans), default=0) - min((start for start, _ in spans), default=0)
    if wall <= 0:
        return None
    return sum(end - start for start, end in spans) / (slots * wall), wall


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
    ]
    if summary["occupancy"] is not None:
        lines.append(f"slots        {summary['slots']} in flight, busy {summary['occupancy']:.2f} of the "
                     f"{summary['wall_s']:.0f} s from this sweep's first trial start to its last trial end")
    lines.append(f"results      {path}")
    if run_log is not None:
        lines.append(f"MLflow run   {run_log.run_id}  (parent of the trials' runs)")
    print("\n".join(["", "── tunelab sweep summary " + "─" * 38, *lines, ""]), flush=True)
