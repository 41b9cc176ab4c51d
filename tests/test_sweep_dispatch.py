"""Sweeps that keep every slot busy (issue 34): n_jobs trials in flight on hydra/launcher=torchrun's CPU processes,
the next one started the moment one ends; real studies in SQLite, real training. The SLURM launcher's own test is in
tests/test_slurm.py (one cluster a session)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, mlflow_runs, subprocess_env
from tests.test_sweep import load_trials, run_sweep, sweep_command

ASYNC_2 = ["hydra/launcher=torchrun", "hydra.sweeper.n_jobs=2"]
# One trial of five times the steps of the others: two to three times their wall time on 2 cores, whose start-up
# (imports, model, data) each trial pays; under heavy load the start-up dominates and the long one is only a little
# longer, which still leaves its slot partner's successors to start while it runs.
SHORT, LONG = 30, 150


def spans(trials) -> dict[int, tuple[float, float]]:
    """Each trial's (start, end) as the trial itself recorded them: its process's start, its training's end. The
    study's datetime_start/complete are the sweeper's ask and tell, which would hide a batch."""
    return {t.number: (t.user_attrs["started_at"], t.user_attrs["ended_at"]) for t in trials}


def occupancy(spans: dict, slots: int) -> float:
    """Busy slot-seconds over slots x the sweep's wall time, from its first trial's start to its last trial's end."""
    wall = max(end for _, end in spans.values()) - min(start for start, _ in spans.values())
    return sum(end - start for start, end in spans.values()) / (slots * wall)


def test_the_next_trial_starts_when_one_ends_not_when_the_batch_does(tmp_path, dataset_cache):
    # The long trial and a short one start together; the short ones follow each other in the other slot while the
    # long one runs. A batch of two would hold the second slot idle until the long trial ended.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="test", storage=storage)
    lengths = [LONG] + [SHORT] * 5
    for steps in lengths:
        study.enqueue_trial({"trainer.max_steps": steps})
    command = [arg for arg in sweep_command(storage, tmp_path / "multirun") if not arg.startswith("trainer.max_steps=")]
    command += [*ASYNC_2, f"hydra.sweeper.n_trials={len(lengths)}", "hydra.sweeper.params=null",
                f"trainer.max_steps=choice({SHORT},{LONG})", "hydra/sweeper/pruner=none", "trainer.val_check_interval=10",
                "logger=none"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=800,
                            env=subprocess_env(tmp_path, dataset_cache))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    trials = load_trials(tmp_path)
    assert [(t.state, t.params["trainer.max_steps"]) for t in trials] == [(TrialState.COMPLETE, n) for n in lengths]
    ran = spans(trials)
    long_end = ran[0][1]
    assert ran[1][0] < long_end  # the two slots started together
    assert ran[1][1] < ran[2][0] < long_end, ran  # trial 2 took trial 1's slot while the long one still ran
    assert occupancy(ran, slots=2) >= 0.85, (occupancy(ran, 2), ran)
    assert "tunelab sweep summary" in result.stdout


def test_a_sweep_killed_with_two_trials_in_flight_reruns_both_and_counts_exactly_n_trials(tmp_path, dataset_cache):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The default callbacks, so trials write checkpoints (validation every 10 steps); a grace period longer than the
    # rerun's deadline: the rerun must see at once that the killed sweep's process is gone.
    args = [*ASYNC_2, "hydra.sweeper.n_trials=4", "callbacks=default", "callbacks.progress_bar=null",
            "callbacks.samples=null", "trainer.max_steps=40", "trainer.val_check_interval=10",
            "hydra.sweeper.grace_period=3600", "hydra/sweeper/pruner=none"]
    sweep = subprocess.Popen(sweep_command(storage, tmp_path / "multirun", *args), cwd=ROOT, start_new_session=True,
                             env=subprocess_env(tmp_path, dataset_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoints = [tmp_path / "multirun" / str(n) / "checkpoints" / "last.ckpt" for n in (0, 1)]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and sweep.poll() is None and not all(c.exists() for c in checkpoints):
        time.sleep(0.1)
    assert sweep.poll() is None, "the sweep ended before it could be killed"
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and both trials' processes
    sweep.wait()
    killed = load_trials(tmp_path)
    assert [t.state for t in killed] == [TrialState.RUNNING] * 2
    assert all(10 <= max(t.intermediate_values) < 40 for t in killed)  # both mid-training

    result = run_sweep(tmp_path, dataset_cache, *args)

    trials = load_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 4, result.stdout[-3000:]
    assert all("failure" not in t.user_attrs for t in trials[:2])  # interrupted, not failed: not counted
    reruns = {t.user_attrs["replaces"]: t for t in trials[2:] if "replaces" in t.user_attrs}
    assert reruns.keys() == {0, 1}
    for number, rerun in reruns.items():
        assert rerun.params == trials[number].params
        assert min(rerun.intermediate_values) > 10 and max(rerun.intermediate_values) == 40  # from the checkpoint
    assert "trials       {'COMPLETE': 4} of n_trials=4" in result.stdout
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert [r.info.status for r in parents + children if r.info.status == "RUNNING"] == []


def test_the_in_process_launcher_runs_one_trial_at_a_time_and_says_so_once(tmp_path, dataset_cache):
    result = run_sweep(tmp_path, dataset_cache, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3",
                       "hydra/sweeper/pruner=none", "logger=none")

    said = [line for line in (result.stdout + result.stderr).splitlines() if "trials run one at a time" in line]
    assert len(said) == 1 and "hydra/launcher=torchrun" in said[0] and "hydra/launcher=slurm" in said[0]
    ran = spans(load_trials(tmp_path))
    assert ran[0][1] < ran[1][0] and ran[1][1] < ran[2][0]  # each after the one before


@pytest.mark.parametrize("args, env, message", [
    (["hydra.sweeper.n_jobs=0"], {}, "hydra.sweeper.n_jobs=0 must be an integer >= 1"),
    (["hydra.sweeper.n_jobs=two", *ASYNC_2[:1]], {}, "hydra.sweeper.n_jobs=two must be an integer >= 1"),
    (["hydra.sweeper.dispatch=eager"], {}, "hydra.sweeper.dispatch=eager: pick one of async, batch"),
    # The launcher sees the node's GPUs through CUDA_VISIBLE_DEVICES: one here, whether or not there is a GPU.
    ([*ASYNC_2, "trainer.devices=2"], {"CUDA_VISIBLE_DEVICES": "0"},
     "each trial runs 2 ranks, one per GPU, and this node has only GPUs 0 (CUDA_VISIBLE_DEVICES)"),
])
def test_bad_dispatch_settings_end_in_one_line_before_any_trial(tmp_path, dataset_cache, args, env, message):
    command = sweep_command(f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "multirun", *args)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**subprocess_env(tmp_path, dataset_cache), **env})

    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]], result.stderr[-3000:]
    assert result.stderr.strip().startswith(f"tunelab: error: {message}"), result.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "multirun").exists()
