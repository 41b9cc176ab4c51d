"""Builds the Lightning Trainer from the `trainer` knobs and the strategy, precision, callbacks and logger groups."""

import logging
import os
import signal
import sys

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn
from omegaconf import DictConfig, OmegaConf

from tunelab.checkpoint import AtomicCheckpointIO, stage_directory_checkpoints
from tunelab.progress import progress_for_this_output
from tunelab.strategy import build_strategy, strategy_accelerator, strategy_devices

log = logging.getLogger("tunelab")


class RunTrainer(pl.Trainer):
    """Lightning's Trainer whose `log_dir` is the run dir whatever the logger: Lightning answers an MLflow logger's
    save_dir, None for a SQL or HTTP store, so a user's callback saving files to `trainer.log_dir` wrote them into the
    working directory; with CSV it answered csv/version_N. The checkpoints keep their own dirpath."""

    @property
    def log_dir(self) -> str:
        return self.default_root_dir


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], logger: Logger | None, model: nn.Module | None = None) -> pl.Trainer:
    """`model` lets a sharding strategy wrap the model's own decoder-layer class."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not kwargs["enable_progress_bar"]:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if logger is None:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]  # it has nowhere to log
    callbacks = progress_for_this_output(callbacks)
    kwargs.update(
        accelerator=strategy_accelerator(cfg.strategy, cfg.trainer),
        devices=strategy_devices(cfg.strategy, cfg.trainer),
        strategy=build_strategy(cfg.strategy, model, cfg.precision.value),
        precision=cfg.precision.value,
        plugins=[AtomicCheckpointIO()],  # every checkpoint file whole or absent, whatever kills the run
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        # tunelab's ResumableSampler already splits the data across ranks.
        use_distributed_sampler=False,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
    )
    kwargs["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    trainer = RunTrainer(**kwargs)
    stage_directory_checkpoints(trainer.strategy)  # sharded FSDP and DeepSpeed write directories past the CheckpointIO
    return trainer


def effective_batch_size(trainer: pl.Trainer, per_device_batch_size: int) -> int:
    """Rows per optimizer step: per-device batch x devices x nodes x accumulation."""
    return per_device_batch_size * trainer.world_size * trainer.accumulate_grad_batches


def stop_every_rank(trainer: pl.Trainer, explained: str | None = None) -> None:
    """After an error on one rank of a multi-process run, end every rank now, with exit code 1. Left alone, the
    others wait in their next NCCL collective until its timeout (30 minutes), and this process's exit waits on them.
    A rank Lightning started is ended by rank 0's launcher watching it exit; torchrun ends the others itself.
    `explained`: the error's one line (tunelab.failures), printed instead of its traceback."""
    if trainer.world_size == 1 or HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep goes on to its next trial
        return
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _SubprocessScriptLauncher):  # rank 0 of a run that started the other ranks itself
        launcher.kill(signal.SIGKILL)
    if explained is None:
        log.exception("rank %d failed; every rank of the run is stopped", trainer.global_rank)
    else:
        print(f"tunelab: error: {explained}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)
