"""Pruning aligned with the LR schedule (issue 14): no decision before the longest warm-up of the search space has
ended, rungs set from the trial's step budget (never "auto"), and a divergence guard that prunes at once.

Early validations rank trials by where their LR warm-up is, not by their promise (BENCHMARKS.md, sweep efficiency),
so the first rung is the end of the longest warm-up. On the `lr_area` clock a trial reports each validation at
step = cumulative LR / peak LR (tunelab.optim.lr_area), so trials with different schedules meet at equal progress.
"""

import math

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import TrialState

CLOCKS = ("step", "lr_area")


def warmup_end(max_steps: int, max_warmup_ratio: float, clock: str = "step") -> int:
    """Where the longest warm-up has ended on `clock`: a warm-up of W steps covers an LR area of W/2."""
    warmup = max_warmup_ratio * max_steps
    return max(1, math.ceil(warmup if clock == "step" else warmup / 2))


def rung_steps(max_steps: int, max_warmup_ratio: float, reduction_factor: int, clock: str = "step") -> list[int]:
    """The rungs on `clock`: the first where the longest warm-up ends, each next one reduction_factor times further,
    all before the end of a trial. A full schedule of T steps covers an LR area of at least T/2 (cosine to
    min_lr_ratio >= 0), so on the lr_area clock the rungs lie in [W/2, T/2)."""
    end = max_steps if clock == "step" else max_steps / 2
    rung, rungs = warmup_end(max_steps, max_warmup_ratio, clock), []
    while rung < end:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def clock_step(area: float, last_step: int) -> int:
    """The step a validation is reported at on the lr_area clock: the LR area rounded, and past the last one, since
    Optuna keeps one value per step and with min_lr_ratio=0 two late validations may round to the same area."""
    return max(round(area), last_step + 1)


def value_at(values: dict[int, float], rung: int) -> float | None:
    """A trial's value at a rung: the one reported at the first step at or past it (None if it never got there).
    Trials of one sweep validate at the same steps, so on the step clock they are compared at the same step."""
    past = [step for step in values if step >= rung]
    return values[min(past)] if past else None


class ScheduleAlignedPruner(BasePruner):
    """Prunes a trial at once when its objective is not finite, or, once the longest warm-up has ended, no better than
    at its first validation (diverged or stuck: during a warm-up the LR may still be too small to move the loss);
    otherwise only at rungs, keeping the best 1/reduction_factor (rounded up) of the trials that reached the rung.

    max_steps: a trial's step budget (trainer.max_steps). max_warmup_ratio: the longest warm-up in the search space, as
    a fraction of max_steps. clock: "step" (validations reported at the optimizer step) or "lr_area" (at the LR area,
    see rung_steps). n_min_trials: a rung decides only once this many trials, this one included, have reached it.
    """

    def __init__(self, max_steps: int, max_warmup_ratio: float, reduction_factor: int = 2, clock: str = "step",
                 n_min_trials: int = 4):
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be an integer >= 1 (the trial's trainer.max_steps)")
        if not 0 <= max_warmup_ratio < 1:
            raise ValueError(f"max_warmup_ratio={max_warmup_ratio} must be within [0, 1)")
        if not isinstance(reduction_factor, int) or reduction_factor < 2:
            raise ValueError(f"reduction_factor={reduction_factor} must be an integer >= 2")
        if clock not in CLOCKS:
            raise ValueError(f"clock={clock} is not one of: {', '.join(CLOCKS)}")
        if not isinstance(n_min_trials, int) or n_min_trials < 1:
            raise ValueError(f"n_min_trials={n_min_trials} must be an integer >= 1")
        self.clock = clock
        self.reduction_factor = reduction_factor
        self.n_min_trials = n_min_trials
        self.warmup_end = warmup_end(max_steps, max_warmup_ratio, clock)
        self.rungs = rung_steps(max_steps, max_warmup_ratio, reduction_factor, clock)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        values = trial.intermediate_values
        step = trial.last_step
        if step is None:
            return False
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        value = values[step]
        if not math.isfinite(value):
            return True
        first = min(values)
        if step >= self.warmup_end and step != first and sign * value >= sign * values[first]:
            return True
        rung = self.rung_decided_at(values, step)
        if rung is None:
            return False
        others = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        competing = [v for t in others if t.number != trial.number
                     and (v := value_at(t.intermediate_values, rung)) is not None and math.isfinite(v)]
        if len(competing) + 1 < self.n_min_trials:
            return False
        keep = math.ceil((len(competing) + 1) / self.reduction_factor)
        better = sum(sign * v < sign * value for v in competing)
        return better >= keep

    def rung_decided_at(self, values: dict[int, float], step: int) -> int | None:
        """The rung this report decides: the last rung at or before `step` that no earlier report had reached."""
        earlier = max((s for s in values if s < step), default=None)
        passed = [r for r in self.rungs if r <= step and (earlier is None or earlier < r)]
        return passed[-1] if passed else None


def job_arguments(pruner_cfg, max_steps: int) -> dict:
    """What the job adds when it builds the pruner: a `max_steps: null` in the pruner's config is the trial's own
    trainer.max_steps (the pruner node is read without the rest of the config, so it cannot interpolate it)."""
    return {"max_steps": max_steps} if "max_steps" in pruner_cfg and pruner_cfg.get("max_steps") is None else {}
