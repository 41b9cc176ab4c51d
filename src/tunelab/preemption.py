"""Preemption: SIGTERM, or the SIGUSR1 that SLURM sends ahead of a time limit, makes a run finish its optimizer step,
save checkpoints/last.ckpt and exit with EXIT_PREEMPTED. Started again in the same run dir, the run continues from
that checkpoint (checkpoint.resolve_ckpt_path) in the same MLflow run (logger.build_logger)."""

import json
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("tunelab")

# EX_TEMPFAIL (sysexits.h): stopped on purpose, to be run again. 143 (128 + SIGTERM) stays a process the signal killed.
EXIT_PREEMPTED = 75
RECORD = "preempted.json"  # in the run dir while its run waits to be continued


class Preempted(SIGTERMException):
    """The run stopped for a preemption signal once its checkpoint was saved. A SystemExit: uncaught, the process exits
    with `code`."""

    def __init__(self, code: int, signal_name: str, step: int, checkpoint: Path, requeue_job: str | None):
        super().__init__(code)
        self.signal_name, self.step, self.checkpoint, self.requeue_job = signal_name, step, checkpoint, requeue_job

    def __str__(self) -> str:
        return f"{self.signal_name} after step {self.step}"


def read_record(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def was_preempted(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RECORD).is_file()


def write_record(run_dir: Path, record: dict) -> None:
    staging = run_dir / f"{RECORD}.tmp-{os.getpid()}"
    staging.write_text(json.dumps(record, indent=1))
    os.replace(staging, run_dir / RECORD)


def agreed_signal(trainer: pl.Trainer, received: int) -> int:
    """The signal any rank received (the highest number where they differ), the same on every rank: one small
    collective on multi-process runs."""
    if trainer.world_size == 1:
        return received
    flag = torch.tensor(received, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(flag, reduce_op="max"))


def slurm_job_to_requeue(trainer: pl.Trainer, signum: int) -> str | None:
    """This SLURM job's id where the signal is SLURM's requeue signal (SIGUSR1, before a time limit), as Lightning's own
    SLURM handler requeues; None for SIGTERM (a cancel, or a preemption SLURM requeues itself), or off SLURM."""
    environment = trainer._accelerator_connector.cluster_environment
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue and signum == environment.requeue_signal):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


def requeue_slurm_job(preempted: Preempted) -> None:
    """Requeues the job (rank 0 only); last thing a preempted process does: SLURM ends the job as it requeues it."""
    if not preempted.requeue_job:
        return
    try:
        subprocess.run(["scontrol", "requeue", preempted.requeue_job], check=True, capture_output=True, text=True)
        log.info("requeued SLURM job %s", preempted.requeue_job)
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("could not requeue SLURM job %s: %s", preempted.requeue_job, getattr(error, "stderr", None) or error)


class PreemptionCheckpoint(Checkpoint):
    """On any of `signals`, every rank finishes its optimizer step, the run saves `dirpath`/last.ckpt and raises
    Preempted (exit EXIT_PREEMPTED), leaving preempted.json in the run dir (signal, step, logger run id).

    A Checkpoint, so Lightning runs it after ModelCheckpoint: where a validation follows the step, the run stops after
    it, once ModelCheckpoint has saved, since a checkpoint taken before a due validation skips it on resume. Otherwise it
    stops at the step's end, which is where ModelCheckpoint's every_n_train_steps saves: both resume exactly.
    """

    def __init__(self, dirpath: str, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        self.dirpath = Path(dirpath)
        self.signals = [signal.Signals[name] for name in signals]
        self.received = 0
        self.agreed = 0

    def receive(self, signum: int, frame) -> None:
        self.received = self.received or signum  # nothing else is safe to do inside a signal handler

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Replaces the SIGTERM handler Lightning registered just before: it broadcasts from inside the handler, and each
        # rank then stops on its own flag, at whatever step (or mid-validation) the signal found it. Lightning restores
        # the handlers from before fit at its teardown.
        for signum in self.signals:
            signal.signal(signum, self.receive)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_accumulate():  # the gradients of an unfinished window are in no checkpoint
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # the run is done anyway
            return
        validation_due = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        if trainer.world_size > 1 and not (validation_due or trainer._logger_connector.should_update_logs):
            return  # agreeing is a collective and a host sync: ranks agree at logging steps and before validations
        self.agreed = agreed_signal(trainer, self.received)
        if self.agreed and not validation_due:
            trainer._logger_connector.update_train_step_metrics()  # what the loop logs right after this hook
            self.stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.agreed and not trainer.sanity_checking:
            self.stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            (self.dirpath.parent / RECORD).unlink(missing_ok=True)  # continued to the end

    def stop(self, trainer: pl.Trainer) -> None:
        checkpoint = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(checkpoint)
        name, step = signal.Signals(self.agreed).name, trainer.global_step
        if trainer.is_global_zero:
            run_id = getattr(trainer.logger, "run_id", None)
            write_record(self.dirpath.parent, {"signal": name, "step": step, "logger_run_id": run_id})
            log.warning("tunelab: preempted by %s after step %d, saved %s; exit %d. To continue, run the same command "
                        "with hydra.run.dir=%s", name, step, checkpoint, EXIT_PREEMPTED, self.dirpath.parent)
        raise Preempted(self.exit_code(trainer), name, step, checkpoint,
                        slurm_job_to_requeue(trainer, self.agreed) if trainer.is_global_zero else None)

    @staticmethod
    def exit_code(trainer: pl.Trainer) -> int:
        """0 on a rank Lightning's launcher started: rank 0 reports for the run, and its launcher kills the whole run,
        rank 0 too, as soon as one of those ranks exits non-zero."""
        started_by_lightning = isinstance(trainer._accelerator_connector.cluster_environment, LightningEnvironment)
        return 0 if started_by_lightning and trainer.global_rank != 0 else EXIT_PREEMPTED
