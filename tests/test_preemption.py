"""Preemption: SIGTERM or SIGUSR1 mid-epoch makes a run finish its step, save last.ckpt and exit 75, its MLflow run
KILLED; the same command then continues it in the same run dir and MLflow run, to the result of an unbroken run."""

import json
import os
import signal

import mlflow
import psutil
import pytest
import torch

from tests.conftest import FAST, run_train
from tests.test_resume import start_train, wait_until

STEPS = 40
COMMON = [*FAST, f"trainer.max_steps={STEPS}", f"optim.total_steps={STEPS}", "trainer.log_every_n_steps=1", "export=false"]
DDP2 = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def last_logged_step(uri: str) -> int:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tunelab")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return max((m.step for r in runs for m in client.get_metric_history(r.info.run_id, "train/loss")), default=-1)


def only_run(uri: str):
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return client, run


def signal_mid_epoch(args: list[str], run_dir, cache_dir, uri: str, signum: int, rank: int = 0) -> tuple[int, str]:
    """Starts train.py, sends `signum` to rank `rank` (0: the process started; 1: the rank Lightning started) once
    step 12 is logged, mid-way through the second epoch (12 batches an epoch), and waits for the run to end."""
    process = start_train(args, run_dir, cache_dir, uri)
    wait_until(lambda: last_logged_step(uri) >= 12, process)
    target = process.pid if rank == 0 else psutil.Process(process.pid).children()[rank - 1].pid
    os.kill(target, signum)
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


def result(run_dir, uri: str) -> dict:
    client, run = only_run(uri)
    val = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    return {"objective": json.loads((run_dir / "objective.json").read_text()), "run": run,
            "val steps": [step for step, _ in val], "val/loss": [value for _, value in val]}


def assert_same_result(continued: dict, unbroken: dict) -> None:
    assert continued["objective"]["global_step"] == unbroken["objective"]["global_step"] == STEPS
    assert continued["objective"]["objective"] == pytest.approx(unbroken["objective"]["objective"], rel=1e-5)
    assert continued["val steps"] == unbroken["val steps"]  # each validation once
    assert continued["val/loss"] == pytest.approx(unbroken["val/loss"], rel=1e-5)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, dataset_cache) -> dict:
    tmp = tmp_path_factory.mktemp("unbroken")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_train(COMMON, tmp / "run", dataset_cache, uri)
    return result(tmp / "run", uri)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signalled_run_saves_and_exits_75_and_the_same_command_continues_it(tmp_path, dataset_cache, unbroken, signum):
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, output = signal_mid_epoch(COMMON, run_dir, dataset_cache, uri, signum)
    assert code == 75, output[-5000:]
    step = json.loads((run_dir / "preempted.json").read_text())["step"]
    assert 12 <= step < STEPS
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    client, run = only_run(uri)
    assert run.info.status == "KILLED"
    assert run.data.tags["tunelab.preempted"] == f"{signal.Signals(signum).name} after step {step}"

    run_train(COMMON, run_dir, dataset_cache, uri)  # the same command, in the same run dir

    continued = result(run_dir, uri)
    assert continued["run"].info.run_id == run.info.run_id and continued["run"].info.status == "FINISHED"
    assert_same_result(continued, unbroken)
    train_steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert train_steps == set(range(STEPS))  # both parts, each step once
    assert not (run_dir / "preempted.json").exists()


def test_a_signal_during_a_step_with_a_validation_stops_after_that_validation(tmp_path, dataset_cache, unbroken):
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped = run_train(COMMON, run_dir, dataset_cache, uri, check=False, script="tests/signalled_train.py",
                        extra_env={"SIGNAL": "SIGTERM", "SIGNAL_STEP": "19"})  # during step 20, validated (every 10)
    assert stopped.returncode == 75, stopped.stderr[-5000:]
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == 20
    client, run = only_run(uri)
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == 19  # step 20's, 0-based

    run_train(COMMON, run_dir, dataset_cache, uri)
    continued = result(run_dir, uri)
    assert continued["run"].info.run_id == run.info.run_id
    assert_same_result(continued, unbroken)


def test_a_signal_to_one_ddp_rank_stops_every_rank_after_the_same_step(tmp_path, dataset_cache):
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, output = signal_mid_epoch([*COMMON, *DDP2], run_dir, dataset_cache, uri, signal.SIGUSR1, rank=1)
    assert code == 75, output[-5000:]
    step = json.loads((run_dir / "preempted.json").read_text())["step"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step

    run_train([*COMMON, *DDP2], run_dir, dataset_cache, uri)
    _, run = only_run(uri)
    assert run.info.status == "FINISHED"
    assert json.loads((run_dir / "objective.json").read_text())["global_step"] == STEPS
