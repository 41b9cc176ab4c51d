"""tunelab's Hydra sweeper: an Optuna study kept in storage, so a sweep resumes, survives failed trials, prunes,
is shared by parallel workers and is recorded in MLflow as one parent run with a child run per trial.

Hydra imports every plugin on each start of train.py, so optuna and mlflow are imported only when a sweep runs.
"""

import logging
import math
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

FAILURE_ATTR = "failure"  # set on trials that failed on their own; lost, interrupted and surplus trials do not count
SURPLUS_ATTR = "surplus"
WORKER_ATTR = "tunelab:worker"  # system attr: the sweep process running the trial (storage.this_worker)


class SweepConfigError(ValueError):
    pass


class StudySweeper(Sweeper):
    def __init__(self, sampler: DictConfig, pruner: DictConfig, storage: str, study_name: str, n_trials: int,
                 n_jobs: int = 1, max_failure_rate: float = 0.5, heartbeat_interval: int = 30,
                 grace_period: int = 120, params: DictConfig | None = None):
        self.sampler = sampler
        self.pruner = pruner
        self.storage = str(storage)
        self.study_name = str(study_name)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.params = params or {}

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
    """One sweep process: asks trials while the study has room, launches them, tells their outcome."""

    def __init__(self, sweeper: StudySweeper, arguments: list[str]):
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        self.sweeper = sweeper
        self.optuna = optuna
        self.run_log = None
        # Heartbeats and fail_stale_trials are flagged experimental; they are what makes a killed sweep resumable.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        specs = [f"{key}={value}" for key, value in sweeper.params.items()] + list(arguments)
        try:
            self.space, self.fixed, self.fixed_overrides = create_params_from_overrides(specs)
        except Exception as error:
            raise SweepConfigError(f"hydra.sweeper.params: {error}") from error
        for name in self.fixed:
            self.space.pop(name, None)
        self.grid = grid_choices(self.space) if sweeper.sampler.get("_target_", "").endswith("GridSampler") else None
        self.n_trials = sweeper.n_trials if self.grid is None else min(sweeper.n_trials, math.prod(map(len, self.grid.values())))
        self.check()

    def check(self) -> None:
        s = self.sweeper
        if not self.space:
            raise SweepConfigError("the sweep has no search space: give hydra.sweeper.params or `key=choice(...)` overrides")
        if s.n_trials < 1 or s.n_jobs < 1:
            raise SweepConfigError(f"hydra.sweeper.n_trials={s.n_trials} and n_jobs={s.n_jobs} must both be >= 1")
        if not 0 <= s.max_failure_rate <= 1:
            raise SweepConfigError(f"hydra.sweeper.max_failure_rate={s.max_failure_rate} must be within [0, 1]")
        if s.objective_mode() not in ("min", "max"):
            raise SweepConfigError(f"objective.mode={s.objective_mode()} is not one of: min, max")
        probe = {**{name: first_value(d) for name, d in self.space.items()}, **self.fixed}
        try:
            s.hydra_context.config_loader.load_sweep_config(s.config, [f"{k}={v}" for k, v in probe.items()] + self.fixed_overrides)
        except Exception as error:
            raise SweepConfigError(f"the search space does not fit the config: {error}".splitlines()[0]) from error
        self.check_pruner()

    def check_pruner(self) -> None:
        """Builds the pruner once, as each trial will, so a bad value is one line here rather than a failed trial."""
        from tunelab.sweep.pruning import job_arguments

        s = self.sweeper
        try:
            instantiate(s.pruner, **job_arguments(s.pruner, s.config.trainer.max_steps),
                        _execution_whitelist_=["optuna.pruners.*", "tunelab.sweep.pruning.*"])
        except Exception as error:
            raise SweepConfigError(f"hydra.sweeper.pruner: {error.__cause__ or error}".splitlines()[0]) from error
        longest = longest_warmup_ratio(self.space.get("optim.warmup_ratio"), s.config.optim.warmup_ratio)
        if (ratio := s.pruner.get("max_warmup_ratio")) is not None and longest is not None and ratio < longest:
            raise SweepConfigError(f"hydra.sweeper.pruner.max_warmup_ratio={ratio} is below the longest warm-up of the "
                                   f"sweep, optim.warmup_ratio={longest}: the first rung must come after every warm-up")

    def run(self) -> None:
        from tunelab.sweep.storage import open_storage, public_location, this_worker
        from tunelab.sweep.tracking import StudyRun

        s = self.sweeper
        try:
            self.storage = open_storage(s.storage, s.heartbeat_interval, s.grace_period, self.on_stale_trial)
            self.study, created = self.open_study()
        except SweepConfigError:
            raise
        except Exception as error:
            raise SweepConfigError(f"hydra.sweeper.storage={public_location(s.storage)}: {error}".splitlines()[0]) from error
        log.info("study %s in %s: %d of n_trials=%d trials done", s.study_name, public_location(s.storage),
                 len(self.counted()), self.n_trials)
        self.run_log = StudyRun.open(s.config, self.study, created, self.space, public_location(s.storage))
        self.heartbeat = Heartbeat(self.storage, s.heartbeat_interval)
        self.worker = this_worker()
        self.in_flight: list = []
        status = "FAILED"
        try:
            while trials := self.next_trials():
                self.launch(trials)
                self.check_failures()
            summary = self.summary()
            self.report(summary)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.heartbeat.stop()
            for trial in list(self.in_flight):  # stopped mid-trial: FAIL without FAILURE_ATTR, queued to run again
                self.tell_state(trial, self.optuna.trial.TrialState.FAIL)
                self.queue_rerun(self.storage.get_trial(trial._trial_id))
            if self.run_log is not None:
                self.run_log.finish(status)

    def fail_lost_trials(self) -> None:
        """Fails the running trials whose worker died: at once where it ran on this machine and its process is gone,
        else once its heartbeat is older than grace_period (fail_stale_trials, which calls on_stale_trial)."""
        from tunelab.sweep.storage import worker_is_gone

        self.optuna.storages.fail_stale_trials(self.study)
        TrialState = self.optuna.trial.TrialState
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.system_attrs.get(WORKER_ATTR)
            if worker is None or not worker_is_gone(worker):
                continue
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    continue
            except self.optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker of this machine failed it first
            reason = f"its process {worker['pid']} on {worker['host']} is gone"
            self.lost(self.storage.get_trial(trial._trial_id), reason)

    def on_stale_trial(self, study, trial) -> None:
        self.lost(trial, f"no heartbeat for {self.sweeper.grace_period}s")

    def lost(self, trial, reason: str) -> None:
        log.warning("trial %d lost its worker (%s): failed, a later trial re-runs its params", trial.number, reason)
        if self.run_log is not None:
            self.run_log.record_trial(trial)
        self.queue_rerun(trial)

    def queue_rerun(self, trial) -> None:
        """Queues `trial`'s params for the next trial asked (by any worker), which takes its place in n_trials and
        resumes from its last checkpoint (resume_overrides)."""
        from tunelab.sweep.trial import REPLACES_ATTR

        self.study.enqueue_trial(trial.params, user_attrs={REPLACES_ATTR: trial.number})

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
        """The trials to run next; none once the study is full and no other worker runs a trial. While other workers'
        trials fill it, waits: one of them may turn out lost, and its place comes back."""
        while not (trials := self.ask()) and (running := self.running_elsewhere()):
            log.info("waiting for trials %s of other workers", running)
            time.sleep(min(5, self.sweeper.heartbeat_interval))
        return trials

    def running_elsewhere(self) -> list[int]:
        if not self.heartbeat.enabled:
            return []  # without heartbeats a dead worker's trial would be waited for forever
        return [t.number for t in self.counted() if t.state == self.optuna.trial.TrialState.RUNNING]

    def ask(self) -> list:
        self.fail_lost_trials()
        room = min(self.sweeper.n_jobs, self.n_trials - len(self.counted()))
        trials = []
        for _ in range(max(room, 0)):
            trial = self.ask_one()
            if trial is None:
                break
            trials.append(trial)
        return trials

    def ask_one(self):
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
        for name, distribution in self.space.items():
            trial._suggest(name, distribution)
        for name, value in self.fixed.items():
            trial.set_user_attr(name, value)
        return trial

    def sampler_for(self, number: int):
        seed = self.sweeper.sampler.get("seed")
        if seed is not None and self.grid is None:
            seed += number  # not for a grid: its seed fixes the order of grid points, which every trial must share
        sampler = instantiate(self.sweeper.sampler, seed=seed,
                              _execution_whitelist_=["optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*"])
        return sampler(self.grid) if self.grid is not None else sampler

    def launch(self, trials: list) -> None:
        launcher = self.sweeper.launcher
        for batch in consecutive(trials):
            overrides = [
                tuple(f"{k}={v}" for k, v in {**t.params, **self.fixed, **self.resume_overrides(t)}.items())
                + tuple(self.fixed_overrides)
                for t in batch
            ]
            # The job number is the trial number: it names the job's dir and lets the job re-open its trial.
            for trial, result in zip(batch, launcher.launch(overrides, initial_job_idx=batch[0].number)):
                self.tell(trial, result)

    def resume_overrides(self, trial) -> dict:
        """{ckpt_path: ...} for a trial that re-runs a lost one which left a last checkpoint this machine can read."""
        from tunelab.sweep.storage import trial_id
        from tunelab.sweep.trial import REPLACES_ATTR, RUN_DIR_ATTR

        if (number := trial.user_attrs.get(REPLACES_ATTR)) is None:
            return {}
        lost = self.storage.get_trial(trial_id(self.storage, self.study.study_name, number))
        if (run_dir := lost.user_attrs.get(RUN_DIR_ATTR)) is None:
            return {}
        checkpoint = Path(run_dir, "checkpoints", "last.ckpt")  # where the default callbacks keep it
        if not checkpoint.exists():
            return {}
        log.info("trial %d re-runs trial %d from its checkpoint %s", trial.number, number, checkpoint)
        return {"ckpt_path": "'" + str(checkpoint).replace("'", "\\'") + "'"}  # quoted: a path may hold = or ,

    def tell(self, trial, result) -> None:
        from tunelab.sweep.trial import PRUNED_ATTR

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

    def check_failures(self) -> None:
        failures = [t for t in self.counted() if FAILURE_ATTR in t.user_attrs]
        allowed = self.sweeper.max_failure_rate * self.n_trials
        if len(failures) > allowed:
            raise SweepConfigError(
                f"{len(failures)} trials failed, more than hydra.sweeper.max_failure_rate="
                f"{self.sweeper.max_failure_rate} of n_trials={self.n_trials} allows; last: "
                f"{failures[-1].user_attrs[FAILURE_ATTR]}".splitlines()[0])

    def summary(self) -> dict:
        from tunelab.sweep.storage import public_location

        trials = self.study.get_trials(deepcopy=False)
        summary = {
            "study_name": self.study.study_name,
            "storage": public_location(self.sweeper.storage),
            "objective": f"{self.sweeper.config.objective.metric} ({self.sweeper.objective_mode()})",
            "n_trials": self.n_trials,
            "trials": dict(Counter(t.state.name for t in self.counted())),
            "best_trial": None, "best_value": None, "best_params": {},
        }
        if any(t.state == self.optuna.trial.TrialState.COMPLETE for t in trials):
            best = self.study.best_trial
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        return summary

    def report(self, summary: dict) -> None:
        path = Path(self.sweeper.config.hydra.sweep.dir) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(summary), path)
        if self.run_log is not None:
            self.run_log.record_best(self.study, summary)
        params = ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()) or "-"
        best = "-" if summary["best_value"] is None else f"{summary['best_value']:.6g} (trial {summary['best_trial']})"
        lines = [
            f"study        {summary['study_name']}  ({summary['storage']})",
            f"trials       {summary['trials']} of n_trials={summary['n_trials']}",
            f"best value   {best}  {summary['objective']}",
            f"best params  {params}",
            f"results      {path}",
        ]
        if self.run_log is not None:
            lines.append(f"MLflow run   {self.run_log.run_id}  (parent of the trials' runs)")
        print("\n".join(["", "── tunelab sweep summary " + "─" * 38, *lines, ""]), flush=True)


class Heartbeat:
    """Beats for this worker's running trials, so other workers can tell them from trials of a dead worker."""

    def __init__(self, storage, interval: int):
        import optuna

        self.storage = storage
        self.interval = interval
        self.enabled = isinstance(storage, optuna.storages.RDBStorage) and bool(interval)
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()
        if self.enabled:
            threading.Thread(target=self.run, name="optuna-heartbeat", daemon=True).start()

    def add(self, trial) -> None:
        if self.enabled:
            self.trial_ids.add(trial._trial_id)
            self.storage.record_heartbeat(trial._trial_id)

    def remove(self, trial) -> None:
        self.trial_ids.discard(trial._trial_id)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for trial_id in list(self.trial_ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a lost beat only risks a late stale mark; keep the sweep going
                    log.warning("heartbeat of trial id %d not recorded: %s", trial_id, error)

    def stop(self) -> None:
        self.stopped.set()


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


def consecutive(trials: list) -> list[list]:
    runs: list[list] = []
    for trial in trials:
        if runs and trial.number == runs[-1][-1].number + 1:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs
