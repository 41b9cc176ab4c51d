"""What a study sweep searches, read and checked once before any trial: the search space from
hydra.sweeper.params and `key=choice(...)` overrides, the fixed overrides, the grid (for sampler=grid), and that a
trial's config and its pruner can be built from them. Every problem is one SweepConfigError line."""

import math
from dataclasses import dataclass

from hydra.utils import instantiate


class SweepConfigError(ValueError):
    pass


DISPATCH = ("async", "batch")  # hydra.sweeper.dispatch (tunelab.sweep.sweeper.StudyLoop.next_trials)


@dataclass
class SearchSpace:
    params: dict  # name -> optuna distribution, what the sampler proposes
    fixed: dict  # name -> value, the same in every trial
    fixed_overrides: list[str]  # overrides that are no param (e.g. +key=value), passed to every trial
    grid: dict | None  # name -> choices, for the grid sampler
    n_trials: int  # hydra.sweeper.n_trials, at most the grid's size


def read_space(sweeper, arguments: list[str]) -> SearchSpace:
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    specs = [f"{key}={value}" for key, value in sweeper.params.items()] + list(arguments)
    try:
        params, fixed, fixed_overrides = create_params_from_overrides(specs)
    except Exception as error:
        raise SweepConfigError(f"hydra.sweeper.params: {error}") from error
    for name in fixed:
        params.pop(name, None)
    grid = grid_choices(params) if sweeper.sampler.get("_target_", "").endswith("GridSampler") else None
    n_trials = sweeper.n_trials if grid is None else min(sweeper.n_trials, math.prod(map(len, grid.values())))
    space = SearchSpace(params, fixed, fixed_overrides, grid, n_trials)
    check_space(sweeper, space)
    return space


def check_space(sweeper, space: SearchSpace) -> None:
    from tunelab.sweep.sampling import PRUNED_TRIALS  # optuna: not at import, which Hydra's plugin discovery does

    s = sweeper
    if not space.params:
        raise SweepConfigError("the sweep has no search space: give hydra.sweeper.params or `key=choice(...)` overrides")
    for key in ("n_trials", "n_jobs"):
        value = getattr(s, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SweepConfigError(f"hydra.sweeper.{key}={value} must be an integer >= 1")
    if s.dispatch not in DISPATCH:
        raise SweepConfigError(f"hydra.sweeper.dispatch={s.dispatch}: pick one of {', '.join(DISPATCH)}")
    if not 0 <= s.max_failure_rate <= 1:
        raise SweepConfigError(f"hydra.sweeper.max_failure_rate={s.max_failure_rate} must be within [0, 1]")
    if s.objective_mode() not in ("min", "max"):
        raise SweepConfigError(f"objective.mode={s.objective_mode()} is not one of: min, max")
    if s.pruned_trials not in PRUNED_TRIALS:
        raise SweepConfigError(f"hydra.sweeper.pruned_trials={s.pruned_trials}: pick one of {', '.join(PRUNED_TRIALS)}")
    if not isinstance(s.fork_steps, int) or isinstance(s.fork_steps, bool) or s.fork_steps < 1:
        raise SweepConfigError(f"hydra.sweeper.fork_steps={s.fork_steps} must be an integer >= 1")
    probe = {**{name: first_value(d) for name, d in space.params.items()}, **space.fixed}
    try:
        s.hydra_context.config_loader.load_sweep_config(s.config, [f"{k}={v}" for k, v in probe.items()] + space.fixed_overrides)
    except Exception as error:
        raise SweepConfigError(f"the search space does not fit the config: {error}".splitlines()[0]) from error
    check_pruner(sweeper, space)


def check_pruner(sweeper, space: SearchSpace) -> None:
    """Builds the pruner once, as each trial will, so a bad value is one line here rather than a failed trial."""
    from tunelab.sweep.pruning import job_arguments

    s = sweeper
    try:
        instantiate(s.pruner, **job_arguments(s.pruner, s.config.trainer.max_steps),
                    _execution_whitelist_=["optuna.pruners.*", "tunelab.sweep.pruning.*"])
    except Exception as error:
        raise SweepConfigError(f"hydra.sweeper.pruner: {error.__cause__ or error}".splitlines()[0]) from error
    longest = longest_warmup_ratio(space.params.get("optim.warmup_ratio"), s.config.optim.warmup_ratio)
    if (ratio := s.pruner.get("max_warmup_ratio")) is not None and longest is not None and ratio < longest:
        raise SweepConfigError(f"hydra.sweeper.pruner.max_warmup_ratio={ratio} is below the longest warm-up of the "
                               f"sweep, optim.warmup_ratio={longest}: the first rung must come after every warm-up")


def grid_choices(space: dict) -> dict:
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    try:
        return {name: OptunaSweeperImpl._to_grid_sampler_choices(d) for name, d in space.items()}
    except (ValueError, AssertionError) as error:
        raise SweepConfigError(f"sampler=grid needs choice() or range() params, not interval(): {error}") from error


def longest_warmup_ratio(distribution, fixed: float | None) -> float | None:
    """The largest optim.warmup_ratio a trial of the sweep can have: the search space's bound, else the config's."""
    if distribution is None:
        return fixed
    if hasattr(distribution, "choices"):
        return max(distribution.choices)
    return distribution.high


def first_value(distribution):
    return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
