"""Optuna sweeps (`train.py -m sweep=lora_search`): real studies in SQLite/PostgreSQL, real MLflow, real training."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT, compose_config, mlflow_runs, subprocess_env
from tunelab.sweep.storage import process_stat, this_worker, worker_is_gone

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


class OutputReader:
    """A process's output read line by line with deadlines: a line that never comes (a reworded log message, a hang)
    kills the process and fails the test instead of blocking it forever."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines, self.output = process, queue.Queue(), ""
        threading.Thread(target=self.pump, daemon=True).start()

    def pump(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, text: str | None, timeout: float) -> str:
        """Everything read so far once a line holding `text` has come (text None: once the output has ended)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"no line saying {text!r} within {timeout} s:\n{self.output[-3000:]}")
            if line is None:
                if text is None:
                    return self.output
                self.process.kill()
                pytest.fail(f"the output ended with no line saying {text!r}:\n{self.output[-3000:]}")
            self.output += line
            if text is not None and text in line:
                return self.output


def load_trials(tmp_path: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="test", storage=storage or f"sqlite:///{tmp_path / 'optuna.db'}").trials


def assert_nothing_running(tracking_uri: str) -> None:
    parents, children = mlflow_runs(tracking_uri)
    assert [r.info.status for r in parents + children if r.info.status == "RUNNING"] == []


def test_sweep_runs_trials_in_the_declared_space_and_nests_them_in_mlflow(tmp_path, dataset_cache):
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.n_trials=6", "hydra/sweeper/pruner=none")

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


def test_sweep_killed_mid_trial_reruns_that_trial_from_its_checkpoint_without_waiting(tmp_path, dataset_cache):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The default callbacks, so trials write checkpoints (validation every 10 steps). A grace period longer than the
    # rerun's own 600 s deadline: a rerun that waited for the killed trial's heartbeat to lapse could not finish.
    args = ["hydra.sweeper.n_trials=3", "callbacks=default", "callbacks.progress_bar=null", "trainer.max_steps=40",
            "trainer.val_check_interval=10", "hydra.sweeper.grace_period=3600"]
    sweep = subprocess.Popen(sweep_command(storage, tmp_path / "multirun", *args), cwd=ROOT, start_new_session=True,
                             env=subprocess_env(tmp_path, dataset_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "multirun" / "1" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sweep.poll() is None and not checkpoint.exists():
        time.sleep(0.1)
    assert sweep.poll() is None, "the sweep ended before it could be killed"
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    killed = load_trials(tmp_path)[1]
    assert killed.state == TrialState.RUNNING and 10 <= max(killed.intermediate_values) < 40  # mid-training
    first_run = {p: p.stat().st_mtime_ns for p in (tmp_path / "multirun").rglob("*") if p.is_file()}

    result = run_sweep(tmp_path, dataset_cache, *args)

    assert f"trial 1 lost its worker (its process {killed.system_attrs['tunelab:worker']['pid']}" in result.stdout
    trials = load_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    lost, rerun = trials[1], trials[2]
    assert "failure" not in lost.user_attrs
    assert rerun.params == lost.params and rerun.user_attrs["replaces"] == 1
    # Resumed from the killed trial's checkpoint (step 10 or later), not trained again from step 0.
    assert min(rerun.intermediate_values) > 10 and max(rerun.intermediate_values) == 40
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in first_run.items())
    assert {p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir()} == {"0", "1", "2", "3"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_number = {c.data.tags["optuna.trial_number"]: c for c in children}
    assert by_number["1"].info.status == "FAILED" and by_number["1"].data.tags["optuna.trial_state"] == "FAIL"
    assert by_number["2"].data.tags["optuna.replaces_trial"] == "1" and by_number["2"].info.status == "FINISHED"
    assert_nothing_running(uri)


@pytest.mark.filterwarnings("ignore:Argument ``heartbeat_interval``", "ignore:Heartbeat of storage")
def test_trial_lost_on_another_machine_is_rerun_once_its_heartbeat_lapses(tmp_path, dataset_cache):
    """A worker cannot look at another machine's processes: it waits out the grace period, then runs the trial again."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(study_name="test", storage=storage)
    elsewhere = study.ask()  # the trial of a worker on another machine, whose pid means nothing here
    elsewhere.suggest_float("optim.lr", 1e-4, 3e-2, log=True)
    elsewhere.suggest_categorical("peft.r", [4, 8, 16, 32])
    elsewhere.suggest_float("optim.warmup_ratio", 0.0, 0.2)
    with subprocess.Popen(["true"]) as ended:
        pass  # its pid is free here, where a worker would count as gone at once
    storage.set_trial_system_attr(elsewhere._trial_id, "tunelab:worker", {"host": "another-machine", "pid": ended.pid})
    command = sweep_command(url, tmp_path / "multirun", "hydra.sweeper.n_trials=2",
                            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    died = threading.Event()

    def beat_until_died():
        while not died.wait(0.5):
            storage.record_heartbeat(elsewhere._trial_id)

    storage.record_heartbeat(elsewhere._trial_id)
    threading.Thread(target=beat_until_died, daemon=True).start()
    sweep = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(tmp_path, dataset_cache), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # The other machine's worker beats until this one has run its own trial and waits for trial 0; then it dies.
    reader = OutputReader(sweep)
    reader.until("waiting for trials [0] of other workers", timeout=300)
    died.set()
    output = reader.until(None, timeout=300)
    sweep.wait(timeout=30)
    assert sweep.returncode == 0, output[-3000:]

    assert "trial 0 lost its worker (no heartbeat for 3s)" in output
    trials = load_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].params == trials[0].params and trials[2].user_attrs["replaces"] == 0
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert_nothing_running(f"sqlite:///{tmp_path / 'mlflow.db'}")



@pytest.mark.parametrize("options, name", [
    (["sweep=lora_search"], "lora_search-tiny-tiny"),
    (["hydra/sweeper=study", "module=dpo", "data=tiny_pairs"], "dpo-tiny-tiny_pairs"),  # the space on the command line
])
def test_a_study_is_named_after_the_options_picked(tmp_path, options, name):
    cfg = compose_config(options, tmp_path, tmp_path)
    assert cfg.hydra.sweeper.study_name == name

def test_worker_is_gone_only_when_its_process_on_this_machine_has_ended():
    alive = this_worker()
    assert not worker_is_gone(alive)
    assert worker_is_gone({**alive, "started": alive["started"] - 1})  # its pid now belongs to a later process
    assert not worker_is_gone({**alive, "host": "another-machine"})
    with subprocess.Popen(["sleep", "30"]) as child:
        record = {**alive, "pid": child.pid, "started": process_stat(child.pid)[1]}
        assert not worker_is_gone(record)
        child.kill()
        time.sleep(0.2)
        assert worker_is_gone(record)  # a zombie: dead, not yet reaped
    assert worker_is_gone(record)


def test_trials_that_raise_or_go_nan_fail_and_the_sweep_goes_on(tmp_path, dataset_cache):
    # batch_size=0 fails the config check (the job raises); lr=1e30 turns the loss NaN, and the divergence guard
    # (kept by callbacks=none) stops the trial at its first step.
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.params=null", "hydra/sweeper/sampler=grid",
                       "data.batch_size=choice(16,0)", "optim.lr=choice(3e-3,1e30)", "hydra.sweeper.max_failure_rate=1.0")

    trials = {(t.params["data.batch_size"], t.params["optim.lr"]): t for t in load_trials(tmp_path)}
    assert len(trials) == 4 and trials[(16, 3e-3)].state == TrialState.COMPLETE
    for key in [(16, 1e30), (0, 3e-3), (0, 1e30)]:
        assert trials[key].state == TrialState.FAIL
    assert "training diverged at step 1" in trials[(16, 1e30)].user_attrs["failure"]  # the guard, not a NaN objective
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
                       "hydra.sweeper.pruner.n_min_trials=1")

    trials = load_trials(tmp_path)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    # Trial 0 (lr=1e-2) runs to the end; lora_search's pruner (nearest_bound) then stops every lr=1e-7 trial, which
    # could not reach trial 0's objective even at trial 0's pace (and may stop an lr=1e-2 seed a little behind it).
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
