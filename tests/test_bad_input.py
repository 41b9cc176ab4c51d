"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing left behind RUNNING."""

import mlflow
import pytest

from tests.conftest import FAST, compose_config, run_train
from tunelab.config import validate_config


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=llama1b", "strategy=fsdp8", "precision=bf16_true"], "strategy fsdp8 needs 8 GPUs, found 0"),
        (["precision=16_mixed"], "precision 16_mixed needs a GPU"),
        (["data=jsonl"], "data=jsonl needs data.path="),
        (["model.name_or_path=/no/such/model", "model.init=pretrained"], "model.name_or_path=/no/such/model: no such local model directory"),
        (["optim.lr=-1"], "optim.lr=-1 must be > 0"),
        (["optim.warmup_steps=10"], "give optim.warmup_steps or optim.warmup_ratio, not both"),
        (["objective.metric=val/accuracy"], "objective.metric=val/accuracy is not one of"),
    ],
)
def test_bad_config_fails_fast_with_one_line(tmp_path, dataset_cache, args, message):
    result = run_train(args, tmp_path / "run", dataset_cache, check=False, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tunelab: error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments(filter_string="name = 'tunelab'")


def test_checkpoint_that_is_not_one_is_refused(tmp_path, dataset_cache):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    result = run_train([f"ckpt_path={broken}"], tmp_path / "run", dataset_cache, check=False, timeout=120)
    assert result.returncode != 0 and "is not a PyTorch checkpoint" in result.stderr.strip().splitlines()[-1]


def test_failure_during_training_ends_the_mlflow_run_failed(tmp_path, dataset_cache):
    # Token ids of the char tokenizer go up to 100: an embedding of 10 rows fails inside the first forward pass.
    result = run_train([*FAST, "+model.config.vocab_size=10"], tmp_path / "run", dataset_cache, check=False)
    assert result.returncode != 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bf16_mixed_over_bf16_weights_warns_to_use_bf16_true(tmp_path, dataset_cache, caplog):
    validate_config(compose_config(["precision=bf16_mixed", "model.dtype=bfloat16"], tmp_path, dataset_cache))
    assert any("precision=bf16_true" in r.getMessage() for r in caplog.records)
    caplog.clear()
    validate_config(compose_config(["precision=bf16_mixed"], tmp_path, dataset_cache))
    assert not any("bf16_true" in r.getMessage() for r in caplog.records)
