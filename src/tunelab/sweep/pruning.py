"""tunelab's pruners (issue 14), measured against Optuna's on replayed sweeps (benchmarks/pruning_replay.py).

NearestTrialBoundPruner, the default of sweep=lora_search, asks whether a trial could still beat the best: it projects
the trial's validation forward by the improvement the most similar complete trial made from the same step. Ranking
trials at a validation, as the median and successive-halving pruners do, prunes the high learning rates that end best:
under a decaying schedule they lead only once the LR has come down (BENCHMARKS.md, pruning replay).

ScheduleAlignedPruner keeps rungs but sets them after the longest warm-up of the search space, from the trial's step
budget (never "auto"); on the `lr_area` clock a trial reports each validation at step = cumulative LR / peak LR
(tunelab.optim.lr_area), so trials with different schedules meet at equal progress.
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


def unit_coordinate(distribution: optuna.distributions.BaseDistribution, value) -> float:
    """A param's value as a point of [0, 1]: by its index among choices, on a log scale where its distribution is."""
    if hasattr(distribution, "choices"):
        choices = distribution.choices
        return choices.index(value) / max(1, len(choices) - 1) if value in choices else 0.0
    low, high = distribution.low, distribution.high
    if getattr(distribution, "log", False):
        return math.log(value / low) / (math.log(high / low) or 1)
    return (value - low) / ((high - low) or 1)


def param_distance(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> float:
    shared = [name for name in a.distributions if name in b.distributions]
    return math.dist([unit_coordinate(a.distributions[n], a.params[n]) for n in shared],
                     [unit_coordinate(b.distributions[n], b.params[n]) for n in shared])


class NearestTrialBoundPruner(BasePruner):
    """Prunes a trial when, improving from its latest validation as much as the most similar complete trial (nearest
    in the search space, each param scaled to [0, 1]) improved from the same step to its objective, it would still
    not beat the best complete trial, unless it is catching up; at once when its objective is not finite.

    Trials that share a learning rate share a curve's shape, which a comparison across all trials misses: high rates
    lag until their schedule decays, then finish best. Improvements are ratios while the values are positive, else
    differences. No decision is made before n_min_trials trials are complete (they measure how much a trial still
    gains), at the last validation (pruning saves nothing there) or on a tie.

    decide_at_first_validation: whether the first validation may prune. Off by default: a first validation says little
    of the end (Kendall tau 0.30 on the LoRA curves of BENCHMARKS.md), and the trials that go on to win there lag most.
    spare_catching_up: keep a trial that improved over its last interval faster than its neighbour did over the same
    steps, however far behind it still is.
    """

    def __init__(self, n_min_trials: int = 4, decide_at_first_validation: bool = False, spare_catching_up: bool = True):
        if not isinstance(n_min_trials, int) or n_min_trials < 1:
            raise ValueError(f"n_min_trials={n_min_trials} must be an integer >= 1")
        self.n_min_trials = n_min_trials
        self.decide_at_first_validation = bool(decide_at_first_validation)
        self.spare_catching_up = bool(spare_catching_up)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        values, step = trial.intermediate_values, trial.last_step
        if step is None:
            return False
        value = values[step]
        if not math.isfinite(value):
            return True
        earlier = max((s for s in values if s < step), default=None)
        if earlier is None and not self.decide_at_first_validation:
            return False
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and math.isfinite(t.value)]
        reached = [t for t in complete if value_at(t.intermediate_values, step) is not None]
        if len(complete) < self.n_min_trials or not reached:
            return False
        nearest = min(reached, key=lambda t: param_distance(trial, t))
        if step >= max(nearest.intermediate_values):
            return False
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        neighbour = nearest.intermediate_values
        if (self.spare_catching_up and earlier is not None and value_at(neighbour, earlier) is not None
                and sign * change(values[earlier], value) < sign * change(value_at(neighbour, earlier),
                                                                          value_at(neighbour, step))):
            return False
        best = min(complete, key=lambda t: sign * t.value).value
        projected = project(value, value_at(neighbour, step), nearest.value)
        # A tie keeps the trial: one that repeats the best trial's params projects onto its objective, up to rounding.
        return sign * (projected - best) > 1e-9 * abs(best)

    def __repr__(self) -> str:
        return (f"NearestTrialBoundPruner(n_min_trials={self.n_min_trials}, decide_at_first_validation="
                f"{self.decide_at_first_validation}, spare_catching_up={self.spare_catching_up})")


def change(then: float, now: float) -> float:
    """How a value moved: a ratio while both are positive, else a difference."""
    return now / then if then > 0 and now > 0 else now - then


def project(value: float, neighbour_then: float, neighbour_final: float) -> float:
    """`value` moved as the neighbour moved from `neighbour_then` to `neighbour_final`."""
    if value > 0 and neighbour_then > 0 and neighbour_final > 0:
        return value * neighbour_final / neighbour_then
    return value + neighbour_final - neighbour_then


def job_arguments(pruner_cfg, max_steps: int) -> dict:
    """What the job adds when it builds the pruner: a `max_steps: null` in the pruner's config is the trial's own
    trainer.max_steps (the pruner node is read without the rest of the config, so it cannot interpolate it)."""
    return {"max_steps": max_steps} if "max_steps" in pruner_cfg and pruner_cfg.get("max_steps") is None else {}
