"""What the sampler learns from a pruned trial (hydra.sweeper.pruned_trials).

Optuna's samplers rank every pruned trial below every complete one. Under a decaying learning rate that steers a
pruned sweep away from high learning rates, whose trials lag early and end best (BENCHMARKS.md, pruning). Where a
trial reports a signal that estimates its end (a cooled fork, tunelab.sweep.signals), the value it last reported is an
honest estimate of where it would rank: `PrunedAsReported` shows the wrapped sampler each pruned trial as complete
with that value. The study itself keeps the trial PRUNED (its summary, MLflow and the pruner see it as it is); only
the sampler's view changes.
"""

import copy

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

PRUNED_TRIALS = ("optuna", "reported")  # hydra.sweeper.pruned_trials: Optuna's own ranking | their last report


def as_reported(trial: FrozenTrial) -> FrozenTrial:
    """A pruned trial as a complete one whose value is the last value it reported (unchanged if it reported none)."""
    if trial.state != TrialState.PRUNED or not trial.intermediate_values:
        return trial
    seen = copy.copy(trial)
    seen.state = TrialState.COMPLETE
    seen.values = [trial.intermediate_values[max(trial.intermediate_values)]]
    return seen


class StudyView:
    """The study as the sampler sees it: every read of its trials goes through `as_reported`."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        wanted = None if states is None else tuple(set(states) | {TrialState.PRUNED})
        trials = map(as_reported, self._study._get_trials(deepcopy=deepcopy, states=wanted, use_cache=use_cache))
        return [t for t in trials if states is None or t.state in states]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class PrunedAsReported(BaseSampler):
    """`sampler`, shown each pruned trial as complete with the value it last reported."""

    def __init__(self, sampler: BaseSampler):
        self.sampler = sampler

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(StudyView(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(StudyView(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(StudyView(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
