"""tunelab's Hydra sweeper: an Optuna study kept in storage, so a sweep resumes, survives failed trials, prunes,
is shared by parallel workers and is recorded in MLflow as one parent run with a child run per trial.

Hydra imports every plugin on each start of train.py, so optuna and mlflow are imported only when a sweep runs.
The parts: `space` reads and checks what is searched, this module proposes and tells trials, `dispatch` keeps n_jobs
of them in flight on the launcher, `recovery` re-runs the trials of dead workers, `summary` reports the outcome,
`tracking` records it all in MLflow.
"""

import logging
import math
import sys
import time
import warnings

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from tunelab.sweep.space import SweepConfigError, read_space

log = logging.getLogger(__name__)

FAILURE_ATTR = "failure"  # set on trials that failed on their own; lost, interrupted and surplus trials do not count
SURPLUS_ATTR = "surplus"


class StudySweeper(Sweeper):
    def __init__(self, sampler: DictConfig, pruner: DictConfig, storage: str, study_name: str, n_trials: int,
                 n_jobs: int = 1, max_failure_rate: float = 0.5, heartbeat_interval: int = 30,
                 grace_period: int = 120, params: DictConfig | None = None, signal: str | None = None,
                 fork_steps: int = 5, pruned_trials: str = "optuna", dispatch: str = "async"):
        self.sampler = sampler
        self.pruner = pruner
        self.storage = str(storage)
        self.study_name = str(study_name)
        self.n_trials = n_trials
        self.n_jobs = n_jobs  # trials in flight (tunelab.sweep.dispatch)
        self.dispatch = dispatch  # async: the next trial starts as one ends; batch: once all n_jobs have ended
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.params = params or {}
        self.signal = signal  # read by each trial (tunelab.sweep.trial)
        self.fork_steps = fork_steps  # val/loss_cooled: the steps of each trial's fork (tunelab.sweep.trial)
        self.pruned_trials = pruned_trials  # what the sampler learns from a pruned trial (tunelab.sweep.sampling)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def objective_mode(self) -> str:
        return self.config.objective.mode

    def sweep(self, arguments: list[str]) -> None:
        try:
            StudyLoop(self, arguments).run()
        except SweepConfigError as error:
            sys.exit(f"tunelab: error: {error}")


class StudyLoop:
    """One sweep process: keeps up to n_jobs trials in flight while the study has room, tells each as it ends."""

    def __init__(self, sweeper: StudySweeper, arguments: list[str]):
        import optuna

        from tunelab.sweep.recovery import LostTrials

        self.sweeper = sweeper
        self.optuna = optuna
        self.run_log = None
        # Heartbeats and fail_stale_trials are flagged experimental; they are what makes a killed sweep resumable.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.space = read_space(sweeper, arguments)
        self.n_trials = self.space.n_trials
        self.lost_trials = LostTrials(sweeper.grace_period)

    def run(self) -> None:
        from tunelab.sweep.recovery import Heartbeat
        from tunelab.sweep.storage import open_storage, public_location, this_worker
        from tunelab.sweep.summary import report, summary
        from tunelab.sweep.tracking import StudyRun

        s = self.sweeper
        try:
            self.storage = open_storage(s.storage, s.heartbeat_interval, s.grace_period, self.lost_trials.on_stale_trial)
            self.study, created = self.open_study()
        except SweepConfigError:
            raise
        except Exception as error:
            raise SweepConfigError(f"hydra.sweeper.storage={public_location(s.storage)}: {error}".splitlines()[0]) from error
        self.lost_trials.study, self.lost_trials.storage = self.study, self.storage
        log.info("study %s in %s: %d of n_trials=%d trials done", s.study_name, public_location(s.storage),
                 len(self.counted()), self.n_trials)
        self.run_log = self.lost_trials.run_log = StudyRun.open(s.config, self.study, created, self.space.params,
                                                                 public_location(s.storage))
        self.heartbeat = Heartbeat(self.storage, s.heartbeat_interval)
        self.worker = this_worker()
        self.in_flight: list = []  # asked, not yet told
        self.ran: list[int] = []  # ids of the trials this process ran to an end
        status = "FAILED"
        try:
            self.run_trials()
            ran = [self.storage.get_trial(trial_id) for trial_id in self.ran]
            report(s, self.study, summary(s, self.study, self.counted(), self.n_trials, ran, self.slots), self.run_log)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.heartbeat.stop()
            for trial in list(self.in_flight):  # stopped mid-trial: FAIL without FAILURE_ATTR, queued to run again
                self.tell_state(trial, self.optuna.trial.TrialState.FAIL)
                self.lost_trials.queue_rerun(self.storage.get_trial(trial._trial_id))
            if self.run_log is not None:
                self.run_log.finish(status)

    def run_trials(self) -> None:
        """Starts trials while there are free slots and room in the study, tells each the moment it ends; returns
        once the study is full and no trial runs, here or (heartbeats on) on another worker. Too many failures stop
        the asking: the trials in flight end and are told, then the sweep stops with one line."""
        from tunelab.sweep.dispatch import Launches, trials_at_once

        self.slots = trials_at_once(self.sweeper.launcher, self.sweeper.n_jobs)
        launches = Launches(self.sweeper.launcher, threads=self.slots > 1)
        while True:
            for trial in self.next_trials():
                launches.start(trial, self.overrides(trial))
            if self.in_flight:
                self.tell(*launches.next_ended())
            elif not self.too_many_failures() and (running := self.running_elsewhere()):
                # One of them may turn out lost, and its place in n_trials come back.
                log.info("waiting for trials %s of other workers", running)
                time.sleep(min(5, self.sweeper.heartbeat_interval))
            else:
                break
        if failures := self.too_many_failures():
            raise SweepConfigError(failures)

    def open_study(self):
        s, optuna = self.sweeper, self.optuna
        direction = {"min": "minimize", "max": "maximize"}[s.objective_mode()]
        try:
            return optuna.create_study(study_name=s.study_name, storage=self.storage, direction=direction), True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=s.study_name, storage=self.storage)
        if study.direction.name.lower() != direction:
            raise SweepConfigError(f"study {s.study_name} is to {study.direction.name.lower()} but objective.mode="
                                   f"{s.objective_mode()}: pick another hydra.sweeper.study_name")
        return study, False

    def counted(self) -> list:
        """The study's trials that use up n_trials: all but those lost with their worker or interrupted, surplus asks,
        and queued ones (waiting for the next ask, which runs them)."""
        TrialState = self.optuna.trial.TrialState
        return [t for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
                and (t.state != TrialState.FAIL or FAILURE_ATTR in t.user_attrs)]

    def next_trials(self) -> list:
        """A trial for each free slot while the study has room; with dispatch=batch, none until every trial in
        flight has ended."""
        if self.too_many_failures() or (self.sweeper.dispatch == "batch" and self.in_flight):
            return []
        trials = []
        while len(self.in_flight) < self.slots and (trial := self.ask()) is not None:
            trials.append(trial)
        return trials

    def running_elsewhere(self) -> list[int]:
        if not self.heartbeat.enabled:
            return []  # without heartbeats a dead worker's trial would be waited for forever
        ours = {t.number for t in self.in_flight}
        return [t.number for t in self.counted() if t.state == self.optuna.trial.TrialState.RUNNING
                and t.number not in ours]

    def ask(self):
        """A new trial, a queued one first; None once the trials counted fill n_trials."""
        self.lost_trials.fail()
        if len(self.counted()) >= self.n_trials:
            return None
        return self.ask_one()

    def ask_one(self):
        from tunelab.sweep.recovery import WORKER_ATTR

        study = self.study
        study.sampler = self.sampler_for(len(study.get_trials(deepcopy=False)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": we beat ourselves
            trial = study.ask()  # a queued trial first
        self.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.worker)
        self.heartbeat.add(trial)
        self.in_flight.append(trial)
        # Another worker may have asked for the last places at the same moment; the later trial gives way.
        if sum(1 for t in self.counted() if t.number < trial.number) >= self.n_trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            self.tell_state(trial, self.optuna.trial.TrialState.FAIL)
            return None
        # Seeded by trial number, so parallel workers and resumed sweeps do not draw the same params again.
        study.sampler = self.sampler_for(trial.number)
        for name, distribution in self.space.params.items():
            trial._suggest(name, distribution)
        for name, value in self.space.fixed.items():
            trial.set_user_attr(name, value)
        return trial

    def sampler_for(self, number: int):
        from tunelab.sweep.sampling import PrunedAsReported

        seed = self.sweeper.sampler.get("seed")
        if seed is not None and self.space.grid is None:
            seed += number  # not for a grid: its seed fixes the order of grid points, which every trial must share
        sampler = instantiate(self.sweeper.sampler, seed=seed,
                              _execution_whitelist_=["optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*"])
        if self.space.grid is not None:
            return sampler(self.space.grid)
        return PrunedAsReported(sampler) if self.sweeper.pruned_trials == "reported" else sampler

    def overrides(self, trial) -> list[str]:
        params = {**trial.params, **self.space.fixed, **self.lost_trials.resume_overrides(trial)}
        return [f"{k}={v}" for k, v in params.items()] + list(self.space.fixed_overrides)

    def tell(self, trial, result) -> None:
        from tunelab.sweep.trial import PRUNED_ATTR

        self.ran.append(trial._trial_id)
        TrialState = self.optuna.trial.TrialState
        try:
            value = float(result.return_value)  # re-raises what the job raised
            if not math.isfinite(value):
                raise ValueError(f"the objective is {value}")
        except Exception as error:
            trial.set_user_attr(FAILURE_ATTR, f"{type(error).__name__}: {error}"[:2000])
            log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
            self.tell_state(trial, TrialState.FAIL)
            return
        attrs = self.storage.get_trial(trial._trial_id).user_attrs
        if PRUNED_ATTR in attrs:
            self.tell_state(trial, TrialState.PRUNED)
        else:
            self.tell_state(trial, TrialState.COMPLETE, value)

    def tell_state(self, trial, state, value: float | None = None) -> None:
        try:
            self.study.tell(trial, state=state, values=None if value is None else [value])
        except RuntimeError as error:
            # GridSampler calls study.stop() once the grid is done, which only works inside study.optimize.
            if "Study.stop" not in str(error):
                raise
        self.heartbeat.remove(trial)
        self.in_flight.remove(trial)
        if self.run_log is not None and not trial.user_attrs.get(SURPLUS_ATTR):
            self.run_log.record_trial(self.storage.get_trial(trial._trial_id))

    def too_many_failures(self) -> str | None:
        """The line that stops the sweep once more trials have failed than max_failure_rate allows; else None."""
        failures = [t for t in self.counted() if FAILURE_ATTR in t.user_attrs]
        if len(failures) <= self.sweeper.max_failure_rate * self.n_trials:
            return None
        return (f"{len(failures)} trials failed, more than hydra.sweeper.max_failure_rate="
                f"{self.sweeper.max_failure_rate} of n_trials={self.n_trials} allows; last: "
                f"{failures[-1].user_attrs[FAILURE_ATTR]}").splitlines()[0]
