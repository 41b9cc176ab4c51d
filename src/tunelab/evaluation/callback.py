"""Builds the `eval` group: BenchmarkEvaluation, the callback that runs lm-evaluation-harness tasks on the model a run
trains (tunelab.evaluation.harness), and logs what they score into the run's MLflow run (tunelab.evaluation.results).

When: the base model once, at the start of fitting, unless its results are cached (`<cache>/eval_base/`, by base
identity, tasks and limit); every `every_n_validations` validations when set, where the scores reach
`trainer.callback_metrics` like val/loss does, so they can be the objective, the checkpoint's monitor and what a
sweep's pruner reads; and the trained model after fitting, unless the last validation evaluated those very weights.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from tunelab.callbacks import ObjectiveTracker, within_fit
from tunelab.errors import ConfigError
from tunelab.evaluation.harness import Distribution, check_tasks, evaluate
from tunelab.strategy import shards_model
from tunelab.evaluation.results import (BASE_RESULTS_FILE, PREFIX, RESULTS_FILE, against_base, base_key, load_base,
                                        metric_values, save_base, summary_lines, to_json)

log = logging.getLogger("tunelab")


class BenchmarkEvaluation(pl.Callback):
    """`tasks` (lm-eval task names), at most `limit` documents each, `batch_size` prompts a forward, `num_fewshot`
    (null: each task's own); every `every_n_validations` validations (null: only after fitting); `base`: the base
    model too, cached under `cache_dir` by `base_key`. The LightningModule's `model` is evaluated as it is in
    memory, with the data module's `tokenizer`."""

    def __init__(self, tasks: list[str], task_manager, tokenizer, limit: int | None = None, batch_size: int = 32,
                 num_fewshot: int | None = None, every_n_validations: int | None = None, base: bool = True,
                 cache_dir: str | None = None, base_key: str | None = None, output_dir: str | None = None):
        self.tasks, self.manager, self.tokenizer = list(tasks), task_manager, tokenizer
        self.limit, self.batch_size, self.num_fewshot = limit, batch_size, num_fewshot
        self.every_n_validations, self.base = every_n_validations, base
        self.cache_dir, self.base_key, self.output_dir = cache_dir, base_key, output_dir
        self.validations = 0
        self.metrics: dict[str, float] = {}       # the latest evaluation's (rank 0's, the same on every rank)
        self.base_metrics: dict[str, float] | None = None
        self.step: int | None = None               # the global step the latest evaluation saw
        self.results: dict | None = None           # the harness's results of the latest evaluation (rank 0)

    # ── when ──────────────────────────────────────────────────────────────────────────────────────────────────────

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.base and self.base_key:
            self.evaluate_base(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not within_fit(trainer) or not self.every_n_validations:
            return
        if trainer.global_step == 0:  # validate_at_start: the weights are the base's, scored at the start of fitting
            metrics = self.base_metrics if self.base_metrics is not None else self.evaluate_trained(trainer, pl_module)
        else:
            self.validations += 1
            if self.validations % self.every_n_validations:
                return
            metrics = self.evaluate_trained(trainer, pl_module)
        for name, value in metrics.items():
            pl_module.log(name, value)  # into callback_metrics: the objective, checkpoint monitor, pruner read it

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step != trainer.global_step:
            metrics = self.evaluate_trained(trainer, pl_module)
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=trainer.global_step)
            tracker = next((c for c in trainer.callbacks if isinstance(c, ObjectiveTracker)), None)
            if tracker is not None and tracker.metric in metrics:  # the objective counts the final weights too
                tracker.validations.append({"step": trainer.global_step, tracker.metric: metrics[tracker.metric]})
        if trainer.is_global_zero and self.results is not None:
            self.write_results(trainer, RESULTS_FILE, self.results)

    # ── what ──────────────────────────────────────────────────────────────────────────────────────────────────────

    def evaluate_trained(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The trained model's scores, with base and delta where the base was evaluated."""
        self.results, metrics = self.run(trainer, pl_module)
        self.metrics, self.step = metrics, trainer.global_step
        return {**metrics, **(against_base(metrics, self.base_metrics) if self.base_metrics else {})}

    def evaluate_base(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cached = load_base(self.cache_dir, self.base_key) if trainer.is_global_zero else None
        if trainer.strategy.broadcast(cached is not None, src=0):
            self.base_metrics = trainer.strategy.broadcast(metric_values(cached) if cached else None, src=0)
            return
        model = pl_module.model
        adapters = getattr(model, "disable_adapter", None)  # a PEFT model is its base with the adapter off
        if trainer.ckpt_path and adapters is None:
            if trainer.is_global_zero:
                log.warning("eval: no cached results of the base model, and a resumed full fine-tune no longer holds "
                            "its weights: no eval/*/delta this run")
            return
        results, self.base_metrics = self.run(trainer, pl_module, base=True)
        if trainer.is_global_zero:
            save_base(self.cache_dir, self.base_key, results)
            self.write_results(trainer, BASE_RESULTS_FILE, results)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"{name}/base": value for name, value in self.base_metrics.items()}, step=0)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, base: bool = False) -> tuple[dict | None, dict]:
        """(the harness's results on rank 0, else None; the metrics, on every rank)."""
        from tunelab.samples import generation_context

        model = pl_module.model
        sharded = shards_model(trainer.strategy)
        distribution = Distribution(trainer.world_size, trainer.global_rank, sharded)
        adapter_off = model.disable_adapter() if base and hasattr(model, "disable_adapter") else nullcontext()
        with generation_context(trainer.strategy.model), adapter_off:
            results = evaluate(model, self.tokenizer, self.manager, self.tasks, self.limit, self.batch_size,
                               self.num_fewshot, distribution)
        metrics = metric_values(results) if results is not None else None
        if distribution.mode == "split":
            metrics = trainer.strategy.broadcast(metrics, src=0)
        if trainer.is_global_zero:
            log.info("eval%s at step %d: %s", " (base)" if base else "", trainer.global_step,
                     ", ".join(f"{k.removeprefix(PREFIX)}={v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr")))
        return (results if trainer.is_global_zero else None), metrics

    def write_results(self, trainer: pl.Trainer, name: str, results: dict) -> None:
        """The harness's results JSON in the run dir, and as an artifact of the MLflow run."""
        from tunelab.logger import log_run_artifact

        path = Path(self.output_dir or trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(results))
        log_run_artifact(trainer.logger, path)

    def summary(self) -> list[str]:
        return summary_lines(self.metrics, self.base_metrics, self.step, self.limit)


def build_evaluation(cfg: DictConfig, tokenizer) -> list[pl.Callback]:
    """[BenchmarkEvaluation] for an `eval` option with tasks, else []. Finds each task (and fetches its data) now,
    before any weights load: a task that is not there, or an objective it does not score, ends in one ConfigError."""
    options = cfg.get("eval")
    if not options:
        return []
    manager = check_tasks(list(options.tasks), cfg.paths.cache_dir)
    check_objective_scored(cfg.objective.metric, manager)
    key = None
    if options.base:
        key = base_key(OmegaConf.to_container(cfg.model, resolve=True), cfg.precision.value,
                       OmegaConf.to_container(cfg.peft, resolve=True).get("quantize_base") if cfg.peft else None,
                       cfg.seed, list(options.tasks), options.limit, options.num_fewshot)
    return [BenchmarkEvaluation(list(options.tasks), manager, tokenizer, limit=options.limit,
                                batch_size=options.batch_size, num_fewshot=options.num_fewshot,
                                every_n_validations=options.every_n_validations, base=options.base,
                                cache_dir=cfg.paths.cache_dir, base_key=key, output_dir=cfg.paths.output_dir)]


def check_objective_scored(objective: str, manager) -> None:
    """An eval/<task>/<metric> objective names a metric its task scores (check_evaluation saw the task is listed)."""
    if not objective.startswith(PREFIX):
        return
    task, _, metric = objective.removeprefix(PREFIX).partition("/")
    metric = metric.split("/")[0].split(".")[0].removesuffix("_stderr")
    loaded = manager.load([task])["tasks"]
    scored = sorted({name for each in loaded.values() for name in each.aggregation()})
    if metric not in scored:
        raise ConfigError(f"objective.metric={objective}: task {task} scores {', '.join(scored)}, not {metric}")
