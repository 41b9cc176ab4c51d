"""tunelab's one entry point: compose the config, build each part from its group, fit, return the objective."""

import gc
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tunelab.config import ConfigError, validate_config

log = logging.getLogger("tunelab")


@hydra.main(config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        validate_config(cfg)
        # The heavy stack is imported only now that the config holds up: --help and config errors stay fast.
        import lightning.pytorch as pl
        from tunelab.callbacks import ObjectiveTracker, build_callbacks, validation_at_start
        from tunelab.checkpoint import gather_fsdp_weights, resolve_ckpt_path
        from tunelab.data import build_datamodule
        from tunelab.evaluation.callback import build_evaluation
        from tunelab.export import export_options
        from tunelab.failures import explain_failure
        from tunelab.inputs import check_inputs, load_tokenizer
        from tunelab.kernel_choice import resolve_kernels
        from tunelab.kernels import apply_kernels, build_loss
        from tunelab.logger import build_logger, log_run_config, logger_callbacks, mark_failed, mark_preempted
        from tunelab.model import build_model, count_parameters
        from tunelab.modules.base import build_module
        from tunelab.peft import apply_peft, base_quantization
        from tunelab.precision import apply_float8
        from tunelab.preemption import Preempted, requeue_slurm_job
        from tunelab.progress import plain_lines_outside_a_terminal
        from tunelab.report import finish_run
        from tunelab.strategy import build_device, runs_on_gpu
        from tunelab.sweep.trial import study_trial_callbacks
        from tunelab.trainer import build_trainer, effective_batch_size, stop_every_rank

        plain_lines_outside_a_terminal()  # in a log, each library's progress bar is the line it ends on
        ckpt_path = resolve_ckpt_path(cfg)
        tokenizer = load_tokenizer(cfg.model)
        check_inputs(cfg, tokenizer)  # data rows, model architecture, LoRA targets: before any weights or MLflow run
        evaluation = build_evaluation(cfg, tokenizer)  # lm-eval tasks found, their data fetched: before training too
    except ConfigError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed and goes on
        sys.exit(f"tunelab: error: {error}")

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, tokenizer)
    on_gpu = runs_on_gpu(cfg.strategy, cfg.trainer)
    model = build_model(cfg.model, cfg.precision, tokenizer, base_quantization(cfg.peft), packed=cfg.data.get("packing", False),
                        device=build_device(cfg.strategy, on_gpu))
    model = apply_float8(apply_peft(model, cfg.peft), cfg.precision)  # precision=fp8: float8 matmuls in the base
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    kernels = resolve_kernels(cfg)
    module = build_module(cfg.module, apply_kernels(model, kernels, cfg.kernels.compile_mode), cfg.optim,
                          adapter_only_checkpoints=bool(cfg.peft), loss=build_loss(kernels, model, cfg.kernels.loss_chunk_size))

    logger = build_logger(cfg)
    tracker = ObjectiveTracker(cfg.objective.metric, cfg.objective.mode)
    callbacks = [*build_callbacks(cfg.callbacks), *evaluation, tracker, *logger_callbacks(cfg), *study_trial_callbacks(cfg, logger),
                 *validation_at_start(cfg.validate_at_start)]
    trainer = build_trainer(cfg, callbacks, logger, model)
    try:
        batch = effective_batch_size(trainer, cfg.data.batch_size)
        log.info("effective batch: %d rows per optimizer step", batch)
        log_run_config(logger, cfg, {"trainable_params": trainable, "total_params": total, "effective_batch_size": batch})
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # On every rank: each sends its shard.
        weights = gather_fsdp_weights(trainer.strategy.model) if export_options(cfg.export).enabled else None
        if trainer.is_global_zero:
            finish_run(cfg, trainer, tracker, model, tokenizer, Path(cfg.paths.output_dir), weights)
    except Preempted as preempted:  # exits 75 with last.ckpt saved; the same command in this run dir continues
        mark_preempted(logger, preempted)
        requeue_slurm_job(preempted)
        raise
    except BaseException as error:
        mark_failed(logger)
        explained = explain_failure(error, cfg, trainer)  # divergence, out of GPU memory: one line, no traceback
        stop_every_rank(trainer, explained)
        if explained is None or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep records the trial as failed and goes on
        sys.exit(f"tunelab: error: {explained}")
    return tracker.best


if __name__ == "__main__":
    main()
    # Python's collection of every object left at exit (torch's, transformers', Lightning's) took 6 s on 2 busy cores,
    # a sweep slot held for nothing: frozen, they go with the process's memory. atexit handlers run as before.
    gc.freeze()
