"""Validation at step 0 (validate_at_start): every val curve starts from the base model, which the objective and the
checkpoints leave out."""

import lightning.pytorch as pl
import mlflow
import pytest

from tests.conftest import FAST, compose_config, run_train
from tunelab.callbacks import ObjectiveTracker


def base_model_validation(cfg) -> dict:
    """The model train.py starts from (same seed, same build), validated by a Lightning Trainer of its own."""
    from tunelab.data import build_datamodule
    from tunelab.inputs import load_tokenizer
    from tunelab.model import build_model
    from tunelab.modules.base import build_module

    tokenizer = load_tokenizer(cfg.model)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, tokenizer)
    module = build_module(cfg.module, build_model(cfg.model, cfg.precision, tokenizer), cfg.optim)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


def test_a_default_run_logs_the_base_models_validation_at_step_0(tmp_path, dataset_cache):
    args = [*FAST, "export=false", "callbacks.samples=null"]
    run_train(args, tmp_path / "run", dataset_cache)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    base = base_model_validation(compose_config(args, tmp_path / "base", dataset_cache))
    assert 0 in history and history[0] == pytest.approx(base["val/loss"], rel=1e-5)
    assert len(history) == 3  # step 0, then one every trainer.val_check_interval of the 20 steps
    # The objective is the best validation after training began, with a checkpoint of it; none is written at step 0.
    assert run.data.metrics["objective"] == min(value for step, value in history.items() if step > 0)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt", "step000020.ckpt"]


def test_the_objective_leaves_out_the_base_even_where_training_made_it_worse():
    tracker = ObjectiveTracker("val/loss", "min")
    tracker.validations = [{"step": 0, "val/loss": 1.0}, {"step": 10, "val/loss": 1.4}, {"step": 20, "val/loss": 1.2}]
    assert tracker.best == 1.2
    tracker = ObjectiveTracker("val/exact_match", "max")
    tracker.validations = [{"step": 0, "val/exact_match": 0.5}, {"step": 10, "val/exact_match": 0.25}]
    assert tracker.best == 0.25
