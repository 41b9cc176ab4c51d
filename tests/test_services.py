"""Prove the service fixtures give real, shared servers: Postgres for Optuna, HTTP for MLflow."""

import subprocess
import sys

import mlflow
import optuna

pytest_plugins = ["tests.services"]

OPTUNA_WORKER = """
import sys
import optuna

storage, study_name = sys.argv[1:]
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True)
study.optimize(lambda trial: (trial.suggest_float("x", -10, 10) - 2) ** 2, n_trials=3)
"""


def test_two_processes_share_one_optuna_study(postgres_url):
    study_name = "two-workers"
    # Optuna creates its schema on first use; two processes doing that at once collide in
    # Postgres (duplicate CREATE TYPE), so create it once up front, as a sweep launcher must.
    optuna.storages.RDBStorage(postgres_url)
    workers = [
        subprocess.Popen([sys.executable, "-c", OPTUNA_WORKER, postgres_url, study_name],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, output

    trials = optuna.load_study(study_name=study_name, storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert sorted(t.number for t in trials) == list(range(6))


def test_mlflow_run_round_trips_through_server(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("services-smoke"))
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    for step, loss in enumerate([0.9, 0.5, 0.2]):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_text(run_id, "hello", "notes.txt")
    client.set_terminated(run_id)

    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"lr": "0.001"}
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.9, 0.5, 0.2]
    notes = client.download_artifacts(run_id, "notes.txt", str(tmp_path))
    assert open(notes).read() == "hello"
