"""Resuming: N steps, then resume to 2N, equals 2N straight: model, optimizer, scheduler, step, data order, RNG."""

import mlflow
import pytest
import torch

from tests.conftest import FAST, run_train

N = 10


def final_val_loss(uri: str, run_dir) -> tuple[int, float]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id], order_by=["start_time DESC"])
    history = client.get_metric_history(runs[0].info.run_id, "val/loss")
    last = max(history, key=lambda m: m.step)
    return last.step, last.value


@pytest.mark.parametrize("peft,packing", [("none", False), ("lora", False), ("none", True)], ids=["full", "lora", "packed"])
def test_resume_matches_straight_run(tmp_path, dataset_cache, peft, packing):
    common = [*FAST, f"peft={peft}", f"trainer.val_check_interval={N}", f"optim.total_steps={2 * N}", "export=false"]
    if packing:  # ~12 examples a packed batch, so the resume at step N falls mid-epoch
        common += ["data.packing=true", "data.pack_tokens=256"]
    if peft == "lora":
        common.append("peft.lora_dropout=0.0")
    straight_uri, resumed_uri = f"sqlite:///{tmp_path / 'straight.db'}", f"sqlite:///{tmp_path / 'resumed.db'}"

    run_train([*common, f"trainer.max_steps={2 * N}"], tmp_path / "straight", dataset_cache, straight_uri)
    run_train([*common, f"trainer.max_steps={N}"], tmp_path / "resumed", dataset_cache, resumed_uri)
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == N and "rng_states" in checkpoint
    run_train([*common, f"trainer.max_steps={2 * N}", "ckpt_path=last"], tmp_path / "resumed", dataset_cache, resumed_uri)

    straight_step, straight_loss = final_val_loss(straight_uri, tmp_path / "straight")
    resumed_step, resumed_loss = final_val_loss(resumed_uri, tmp_path / "resumed")
    assert straight_step == resumed_step == 2 * N - 1
    assert resumed_loss == pytest.approx(straight_loss, rel=1e-5, abs=1e-6)
