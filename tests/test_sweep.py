"""Optuna sweeps (`train.py -m sweep=lora_search`): real studies in SQLite/PostgreSQL, real MLflow, real training."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT, mlflow_runs, subprocess_env

pytest_plugins = ["tests.services"]

# Short trials: every sweep test runs several of them on a 2-core CPU.
FAST = ["trainer.max_steps=10", "trainer.val_check_interval=5", "data.num_examples=200", "callbacks=none",
        "export=false", "trainer.log_every_n_steps=5"]


def sweep_command(storage: str, sweep_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=test", f"hydra.sweep.dir={sweep_dir}", *FAST, *args]


def run_sweep(tmp_path: Path, cache: Path, *args: str, storage: str | None = None, check: bool = True,
              tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    storage = storage or f"sqlite:///{tmp_path / 'optuna.db'}"
    result = subprocess.run(sweep_command(storage, tmp_path / "multirun", *args), cwd=ROOT, capture_output=True,
                            text=True, env=subprocess_env(tmp_path, cache, tracking_uri), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"sweep exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def load_trials(tmp_path: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="test", storage=storage or f"sqlite:///{tmp_path / 'optuna.db'}").trials


def assert_nothing_running(tracking_uri: str) -> None:
    parents, children = mlflow_runs(tracking_uri)
    assert [r.info.status for r in parents + children if r.info.status == "RUNNING"] == []


def test_sweep_runs_trials_in_the_declared_space_and_nests_them_in_mlflow(tmp_path, dataset_cache):
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.n_trials=6")

    trials = load_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    for t in trials:
        assert 1e-4 <= t.params["optim.lr"] <= 3e-2
        assert t.params["peft.r"] in (4, 8, 16, 32)
        assert 0.0 <= t.params["optim.warmup_ratio"] <= 0.2
    assert len({(t.params["optim.lr"], t.params["peft.r"]) for t in trials}) == 6
    best = min(trials, key=lambda t: t.value)
    assert "best value" in result.stdout and f"optim.lr={best.params['optim.lr']}" in result.stdout
    assert (tmp_path / "multirun" / "optimization_results.yaml").read_text().count(str(best.params["optim.lr"])) == 1

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for t in trials:
        child = by_number[t.number]
        assert child.data.tags["optuna.trial_state"] == "COMPLETE" and child.info.status == "FINISHED"
        assert float(child.data.params["optim/lr"]) == pytest.approx(t.params["optim.lr"])
        assert int(child.data.params["peft/r"]) == int(child.data.params["peft/lora_alpha"]) == t.params["peft.r"]
        assert child.data.metrics["objective"] == pytest.approx(t.value)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert "search.optim.lr" in parent.data.params
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "plots")}
    assert artifacts == {f"plots/{name}.png" for name in ("optimization_history", "param_importances", "parallel_coordinate")}


def test_killed_sweep_resumes_to_exactly_n_trials_without_overwriting(tmp_path, dataset_cache):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Trials long enough (seconds, not a fraction of one) that trial 2 is surely still training when killed.
    args = ["hydra.sweeper.n_trials=4", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2",
            "trainer.max_steps=40", "trainer.val_check_interval=20"]
    sweep = subprocess.Popen(sweep_command(storage, tmp_path / "multirun", *args), cwd=ROOT, start_new_session=True,
                             env=subprocess_env(tmp_path, dataset_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Trials run one after the other, so trial 2's dir appearing means trials 0 and 1 are done.
    while time.monotonic() < deadline and sweep.poll() is None and not (tmp_path / "multirun" / "2").exists():
        time.sleep(0.1)
    assert sweep.poll() is None, "the sweep ended before it could be killed"
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    first_run = {p: p.stat().st_mtime_ns for p in (tmp_path / "multirun").rglob("*") if p.is_file()}
    time.sleep(2.5)  # past the grace period, so the killed trial is stale

    run_sweep(tmp_path, dataset_cache, *args)

    trials = load_trials(tmp_path)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == 5
    killed = trials[2]
    assert killed.state == TrialState.FAIL and "failure" not in killed.user_attrs
    assert [t.state for t in trials if t.number != 2] == [TrialState.COMPLETE] * 4
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in first_run.items())
    assert {p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir()} == {"0", "1", "2", "3", "4"}
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 5
    assert {c.data.tags["optuna.trial_number"]: c.info.status for c in children}["2"] == "FAILED"
    assert_nothing_running(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_trials_that_raise_or_go_nan_fail_and_the_sweep_goes_on(tmp_path, dataset_cache):
    # batch_size=0 fails the config check (the job raises); lr=1e30 turns the weights and the loss NaN.
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.params=null", "hydra/sweeper/sampler=grid",
                       "data.batch_size=choice(16,0)", "optim.lr=choice(3e-3,1e30)", "hydra.sweeper.max_failure_rate=1.0")

    trials = {(t.params["data.batch_size"], t.params["optim.lr"]): t for t in load_trials(tmp_path)}
    assert len(trials) == 4 and trials[(16, 3e-3)].state == TrialState.COMPLETE
    for key in [(16, 1e30), (0, 3e-3), (0, 1e30)]:
        assert trials[key].state == TrialState.FAIL
    assert "objective is nan" in trials[(16, 1e30)].user_attrs["failure"]
    assert "ConfigError" in trials[(0, 3e-3)].user_attrs["failure"]
    assert "best value" in result.stdout
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FAILED", "FINISHED"]
    assert_nothing_running(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_too_many_failures_stop_the_sweep_with_one_line(tmp_path, dataset_cache):
    result = run_sweep(tmp_path, dataset_cache, "data.batch_size=0", "hydra.sweeper.n_trials=8",
                       "hydra.sweeper.max_failure_rate=0.25", check=False)

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("tunelab: error: 3 trials failed, more than")
    assert len(load_trials(tmp_path)) == 3
    parents, _ = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert_nothing_running(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_pruning_stops_trials_with_bad_learning_rates_early(tmp_path, dataset_cache):
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.params=null", "hydra/sweeper/sampler=grid",
                       "optim.lr=choice(1e-2,1e-7)", "seed=choice(1,2,3)", "trainer.max_steps=20",
                       "hydra.sweeper.pruner.n_startup_trials=1")

    trials = load_trials(tmp_path)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    # Trial 0 (lr=1e-2) runs to the end; the median pruner then stops every lr=1e-7 trial (and may stop an unlucky
    # lr=1e-2 seed too: it compares with the median, not with an oracle).
    assert trials[0].params["optim.lr"] == 1e-2 and trials[0].state == TrialState.COMPLETE
    assert all(t.state == TrialState.PRUNED for t in trials if t.params["optim.lr"] == 1e-7), result.stdout[-3000:]
    assert all(t.user_attrs["pruned_at_step"] < 20 and max(t.intermediate_values) < 20 for t in pruned)
    assert all(max(t.intermediate_values) == 20 for t in trials if t.state == TrialState.COMPLETE)
    _, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    marked = {c.data.tags["optuna.trial_number"] for c in children if c.data.tags["optuna.trial_state"] == "PRUNED"}
    assert marked == {str(t.number) for t in pruned}
    assert all(c.info.status == "KILLED" for c in children if c.data.tags["optuna.trial_number"] in marked)


def test_two_workers_share_one_postgres_study(tmp_path, dataset_cache, postgres_url, mlflow_server):
    optuna.storages.RDBStorage(postgres_url)  # create the schema once; two workers creating it at once race
    command = sweep_command(postgres_url, tmp_path / "multirun", "hydra.sweeper.n_trials=4")
    workers = [subprocess.Popen(command, cwd=ROOT, env=subprocess_env(tmp_path, dataset_cache, mlflow_server),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    trials = load_trials(tmp_path, postgres_url)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    launched = [{line.split("#")[1].split(" ")[0] for line in out.splitlines() if "\t#" in line} for out in outputs]
    assert launched[0] and launched[1] and not launched[0] & launched[1]
    parents, children = mlflow_runs(mlflow_server)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert_nothing_running(mlflow_server)
