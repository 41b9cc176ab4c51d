"""The job side of a study sweep: ties a training run to the Optuna trial it is, reports and prunes.

Hydra's sweeper never hands the `optuna.Trial` to the job (facebookresearch/hydra#1710), and the job may run in
another process or on another machine, so the job re-opens its trial from the study's storage: the study name and
storage come from the sweeper's config, the trial number is the job number (the sweeper launches each trial with
its number as job number).
"""

import functools
import logging
import os
import time

import lightning.pytorch as pl
import optuna
import psutil
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from tunelab.optim import lr_area, warmup_steps
from tunelab.sweep.pruning import clock_step, job_arguments
from tunelab.sweep.storage import open_storage, trial_id

log = logging.getLogger(__name__)

SWEEPER_TARGET = "tunelab.sweep.sweeper.StudySweeper"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
PRUNED_ATTR = "pruned_at_step"
RUN_DIR_ATTR = "run_dir"
REPLACES_ATTR = "replaces"  # on a trial that re-runs a lost or interrupted trial's params: that trial's number
# When the trial's own process started and its training ended (Unix time): what it held its slot for. The study's
# datetime_start and datetime_complete are the sweeper's ask and tell, which a launcher's waiting can stretch.
STARTED_ATTR = "started_at"
ENDED_ATTR = "ended_at"
TRIAL_NUMBER_ENV = "TUNELAB_TRIAL_NUMBER"  # set by hydra/launcher=torchrun on the jobs it starts


class StudyTrialCallback(pl.Callback):
    """Reports each validation's objective to the trial and stops the run when the pruner says so. With a `signal`
    (a metric of tunelab.sweep.signals, e.g. val/loss_cooled) it reports that where a validation has one: the pruner
    compares it, and a pruned trial tells the sampler its last."""

    def __init__(self, trial: optuna.Trial, metric: str, lr_area_of: DictConfig | None = None, signal: str | None = None):
        self.trial = trial
        self.metric = metric
        self.signal = signal
        self.lr_area_of = lr_area_of  # an optim config: report on its LR-area clock instead of the optimizer step
        self.last_reported = -1

    def clock(self, trainer: pl.Trainer) -> int:
        if self.lr_area_of is None:
            return trainer.global_step
        total = int(self.lr_area_of.total_steps or trainer.estimated_stepping_batches)
        area = lr_area(trainer.global_step, total, warmup_steps(self.lr_area_of, total), self.lr_area_of.min_lr_ratio)
        self.last_reported = clock_step(area, self.last_reported)
        return self.last_reported

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step == 0:  # the base model (validate_at_start) is no progress
            return
        prune = False
        metrics = trainer.callback_metrics
        value = metrics.get(self.signal) if self.signal in metrics else metrics.get(self.metric)
        if trainer.is_global_zero and value is not None:
            self.trial.report(float(value), step=self.clock(trainer))
            prune = self.trial.should_prune()
        # Every rank must stop together, or the ones still training wait forever in their next collective.
        if trainer.strategy.broadcast(prune, src=0):
            if trainer.is_global_zero:
                self.trial.set_user_attr(PRUNED_ATTR, trainer.global_step)
                log.info("trial %d pruned at step %d", self.trial.number, trainer.global_step)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.trial.set_user_attr(ENDED_ATTR, time.time())


def attach_run(trial: optuna.Trial, logger, run_name: str | None) -> None:
    """Creates the job's MLflow run already nested under the study's run and tagged with the trial, and records it on
    the trial at once: a trial killed at any later moment leaves a run the sweeper can find and end, never an orphan.
    The run is named `<run_name>-trial<N>`: every trial of a sweep gets the same run_name (its time is the sweep's)."""
    if not isinstance(logger, MLFlowLogger):
        return
    tags = {"optuna.study_name": trial.study.study_name, "optuna.trial_number": str(trial.number)}
    if parent := trial.study.user_attrs.get(PARENT_RUN_ATTR):
        tags["mlflow.parentRunId"] = parent
    logger.tags = {**(logger.tags or {}), **tags}
    trial.set_user_attr(RUN_ATTR, logger.run_id)  # run_id creates the run, with those tags
    logger.experiment.update_run(logger.run_id, name=f"{run_name or 'trial'}-trial{trial.number}")


def study_trial_callbacks(cfg: DictConfig, logger=None) -> list[pl.Callback]:
    """[StudyTrialCallback] when this run is a trial of a tunelab study sweep, else [].

    A trial is a job of the sweep itself (multirun), or a single run that hydra/launcher=torchrun started for it:
    that launcher marks it with TUNELAB_TRIAL_NUMBER and passes the job number and the sweeper's settings on.
    """
    hydra = HydraConfig.get()
    is_trial = hydra.mode == RunMode.MULTIRUN or TRIAL_NUMBER_ENV in os.environ
    if not is_trial or hydra.sweeper.get("_target_") != SWEEPER_TARGET:
        return []
    trial = open_trial(hydra.sweeper, hydra.job.num, cfg.trainer.max_steps)
    trial.set_user_attr(RUN_DIR_ATTR, str(cfg.paths.output_dir))  # where a re-run of this trial finds its checkpoint
    # Its process's start, unless the process is older than the trial: Hydra's in-process launcher runs every trial in
    # the sweep's own process, where a trial starts when it is asked.
    trial.set_user_attr(STARTED_ATTR, max(psutil.Process().create_time(), trial.datetime_start.timestamp()))
    attach_run(trial, logger, OmegaConf.select(cfg, "logger.run_name"))
    lr_area_of = cfg.optim if hydra.sweeper.pruner.get("clock") == "lr_area" else None
    signal = hydra.sweeper.get("signal")
    return [*signal_callbacks(hydra.sweeper, cfg.callbacks),
            StudyTrialCallback(trial, cfg.objective.metric, lr_area_of, signal)]


def signal_callbacks(sweeper: DictConfig, callbacks: DictConfig | None) -> list[pl.Callback]:
    """What produces the sweep's signal, where the trial's own callbacks have nothing that does: a CooldownFork of
    `fork_steps` for val/loss_cooled, a WeightAverage for val/loss_ema. None where nothing is pruned (a fork's steps
    would buy nothing) or the signal is another metric."""
    from tunelab.sweep.signals import PRODUCERS

    signal = sweeper.get("signal")
    if signal not in PRODUCERS or str(sweeper.pruner.get("_target_", "")).endswith("NopPruner"):
        return []
    producer = PRODUCERS[signal]
    targets = [str(c.get("_target_", "")) for c in (callbacks or {}).values() if isinstance(c, DictConfig)]
    if any(target.endswith(producer.__name__) for target in targets):
        return []
    return [producer(steps=sweeper.get("fork_steps", 5))] if signal == "val/loss_cooled" else [producer()]


def open_trial(sweeper: DictConfig, number: int, max_steps: int) -> optuna.Trial:
    storage = shared_storage(sweeper.storage)
    pruner = instantiate(sweeper.pruner, **job_arguments(sweeper.pruner, max_steps),
                         _execution_whitelist_=["optuna.pruners.*", "tunelab.sweep.pruning.*"])
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=pruner)
    return optuna.Trial(study, trial_id(storage, sweeper.study_name, number))


@functools.cache
def shared_storage(location: str):
    # One storage (one connection pool) per process, however many trials run in it.
    return open_storage(location)
