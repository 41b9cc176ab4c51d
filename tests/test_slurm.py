"""hydra/launcher=slurm against a real single-node SLURM cluster without accounting (tests.services.slurm_cluster):
study sweeps, DDP over SLURM tasks, SIGUSR1 from `scancel --signal=USR1` (save, requeue, continue), and job states
from squeue where sacct has none. Every SLURM test lives in this file, so that xdist's --dist loadfile starts one
cluster per session."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT, subprocess_env

pytest_plugins = ["tests.services"]

SQUEUE_NOTICE = "job states come from squeue instead"
SACCT_NOISE = "Bypassing sacct error"
STEPS = 40
# Runs long enough to be signalled mid-way (12 batches an epoch), with the default callbacks, which save last.ckpt
# and handle the signal, less the progress bar and generation samples.
PREEMPTIBLE = ["callbacks.progress_bar=null", "callbacks.samples=null", f"trainer.max_steps={STEPS}",
               f"optim.total_steps={STEPS}", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
               "data.num_examples=400", "export=false"]
SHORT = ["trainer.max_steps=10", "trainer.val_check_interval=5", "data.num_examples=200", "callbacks=none",
         "export=false", "trainer.log_every_n_steps=5"]


class Multirun:
    """`train.py -m` through the SLURM launcher on the test cluster, as a user of a CPU-only cluster would set it, its
    output in `<tmp_path>/multirun.log`."""

    def __init__(self, cluster, tmp_path: Path, cache: Path, tracking_uri: str, *args: str):
        self.cluster, self.dir, self.log = cluster, tmp_path / "multirun", tmp_path / "multirun.log"
        command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm",
                   f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.gpus_per_node=null",
                   "hydra.launcher.mem_gb=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
                   "trainer.accelerator=cpu", f"hydra.sweep.dir={self.dir}", *args]
        env = {**subprocess_env(tmp_path, cache, tracking_uri), **cluster.env}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def report(self) -> str:
        """The multirun's output and its jobs' logs, for a failure."""
        logs = sorted((self.dir / ".submitit").glob("*/*_log.*"))
        return "\n".join([self.output()[-4000:], *(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
                                                   for log in logs)])

    def finish(self, timeout: float = 400) -> str:
        """Waits for the multirun to end; its output. One still going after `timeout` s is killed."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"multirun still running after {timeout} s:\n{self.report()}")
        return self.output()

    def succeed(self) -> str:
        text = self.finish()
        assert self.process.returncode == 0, f"multirun exited {self.process.returncode}:\n{self.report()}"
        return text

    def wait_for(self, condition, timeout: float = 300):
        """The first true value of condition(), polled while the multirun runs."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if self.process.poll() is not None:
                raise AssertionError(f"multirun exited {self.process.returncode} first:\n{self.report()}")
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                raise AssertionError(f"still waiting after {timeout} s:\n{self.report()}")
            time.sleep(0.2)
        return value

    def job_id(self, job_num: int) -> str:
        """SLURM's id of Hydra job `job_num`: hydra.job.id, which submitit sets (`<array job>_<task>`)."""
        return yaml.safe_load((self.dir / str(job_num) / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]

    def signal_mid_run(self, job_num: int, client: MlflowClient, find_runs) -> int:
        """`scancel --signal=USR1` to job `job_num` once its MLflow run (one of find_runs()) has logged step 12 of
        train/loss, in its second epoch; returns the last step logged then."""
        run = self.wait_for(lambda: next((r for r in find_runs() if last_step(client, r) >= 12), None))
        self.cluster.run("scancel", "--signal=USR1", self.job_id(job_num))
        return last_step(client, run)

    def restarts(self, job_num: int) -> int:
        fields = self.cluster.run("scontrol", "show", "job", self.job_id(job_num)).split()
        return int(dict(field.split("=", 1) for field in fields if "=" in field)["Restarts"])


def last_step(client: MlflowClient, run) -> int:
    return max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")), default=-1)


def experiment_runs(client: MlflowClient, experiment: str, query: str = "") -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], query) if found else []


def assert_one_line_about_sacct(text: str) -> None:
    """Without accounting storage, one line says where job states come from instead; nothing per poll."""
    assert SACCT_NOISE not in text, text[-5000:]
    assert len([line for line in text.splitlines() if SQUEUE_NOTICE in line]) == 1, text[-5000:]


def test_a_sweep_trial_preempted_by_scancel_usr1_is_requeued_counts_once_and_ends_as_its_unbroken_twin(
        slurm_cluster, mlflow_server, postgres_url, tmp_path, dataset_cache):
    # A search space of one point: both trials (a 2-job array) train the same params from the same seed, so trial 1 is
    # the unbroken twin of trial 0, which gets SIGUSR1 mid-way, saves, requeues its job and continues (LoRA dropout
    # on: its masks after the resume must be the unbroken run's too).
    experiment = "slurm-sweep"
    multirun = Multirun(slurm_cluster, tmp_path, dataset_cache, mlflow_server, *PREEMPTIBLE, "sweep=lora_search",
                        "peft.r=choice(8)", "optim.lr=3e-3", "optim.warmup_ratio=0.1",
                        f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=slurm",
                        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/sweeper/pruner=none",
                        f"experiment_name={experiment}")
    client = MlflowClient(mlflow_server)
    signalled_at = multirun.signal_mid_run(
        0, client, lambda: experiment_runs(client, experiment, "tags.`optuna.trial_number` = '0'"))
    text = multirun.succeed()

    # Each trial once in the study and in n_trials, the preempted one too, each nested under the study's MLflow run.
    trials = optuna.load_study(study_name="slurm", storage=postgres_url).trials
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert "trials       {'COMPLETE': 2} of n_trials=2" in text
    runs = experiment_runs(client, experiment)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert children.keys() == {0, 1} and parent.info.status == "FINISHED"
    for trial in trials:
        child = children[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert child.data.metrics["objective"] == pytest.approx(trial.value)
    # Trial 0 stopped after the signal, requeued its job once and continued from its checkpoint in the same MLflow
    # run: every step and validation once, each validation loss its unbroken twin's.
    preempted, unbroken = children[0], children[1]
    stopped_at = int(preempted.data.tags["tunelab.preempted"].removeprefix("SIGUSR1 after step "))
    assert signalled_at <= stopped_at < STEPS
    assert multirun.restarts(0) == 1 and multirun.restarts(1) == 0
    assert sorted(m.step for m in client.get_metric_history(preempted.info.run_id, "train/loss")) == list(range(STEPS))
    history = {run: client.get_metric_history(run.info.run_id, "val/loss") for run in (preempted, unbroken)}
    assert [m.step for m in history[preempted]] == [m.step for m in history[unbroken]]
    assert history[unbroken][-1].step == STEPS - 1
    assert [m.value for m in history[preempted]] == pytest.approx([m.value for m in history[unbroken]], rel=1e-5)
    assert trials[0].value == pytest.approx(trials[1].value, rel=1e-5)
    assert not (multirun.dir / "0" / "preempted.json").exists()
    assert_one_line_about_sacct(text)


def test_an_asynchronous_two_slot_sweep_submits_a_job_for_each_trial_as_a_slot_frees(
        slurm_cluster, mlflow_server, postgres_url, tmp_path, dataset_cache):
    # Trial 0 trains eight times the steps of the others: trial 2 is submitted, as a job of its own, when trial 1
    # ends, while trial 0 still runs; an array of two would have held trial 1's place until trial 0 ended.
    experiment, lengths = "slurm-async", [80, 10, 10, 10]
    study = optuna.create_study(study_name="async", storage=postgres_url)
    for steps in lengths:
        study.enqueue_trial({"trainer.max_steps": steps})
    multirun = Multirun(slurm_cluster, tmp_path, dataset_cache, mlflow_server, *SHORT[2:], "sweep=lora_search",
                        "hydra.sweeper.params=null", "trainer.max_steps=choice(10,80)", "trainer.val_check_interval=10",
                        f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=async",
                        "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/sweeper/pruner=none",
                        f"experiment_name={experiment}")
    text = multirun.succeed()

    trials = optuna.load_study(study_name="async", storage=postgres_url).trials
    assert [(t.state, t.params["trainer.max_steps"]) for t in trials] == [(TrialState.COMPLETE, n) for n in lengths]
    assert "trials       {'COMPLETE': 4} of n_trials=4" in text
    jobs = [multirun.job_id(n) for n in range(4)]
    assert len({job.split("_")[0] for job in jobs}) == 4, jobs  # a SLURM job for each trial, no array of a batch
    started = {t.number: t.user_attrs["started_at"] for t in trials}
    ended = {t.number: t.user_attrs["ended_at"] for t in trials}
    assert ended[1] < started[2] < ended[0], (started, ended)
    runs = experiment_runs(MlflowClient(mlflow_server), experiment)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_ddp_runs_as_two_slurm_tasks_of_one_job(slurm_cluster, tmp_path, dataset_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    multirun = Multirun(slurm_cluster, tmp_path, dataset_cache, uri, *SHORT, "strategy=ddp", "trainer.devices=2")
    multirun.succeed()

    job_id = multirun.job_id(0)
    for task in (0, 1):  # each SLURM task is one rank of the same world of 2
        log = (multirun.dir / ".submitit" / job_id / f"{job_id}_{task}_log.out").read_text()
        assert f"GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in log, multirun.report()
    client = MlflowClient(uri)
    (run,) = experiment_runs(client, "tunelab")
    assert run.info.status == "FINISHED"
    config = yaml.safe_load((multirun.dir / "0" / ".hydra" / "config.yaml").read_text())
    assert int(run.data.params["effective_batch_size"]) == 2 * config["data"]["batch_size"]


def test_a_job_that_ends_without_a_result_fails_the_multirun_with_its_slurm_state(slurm_cluster, tmp_path, dataset_cache):
    # Held, then cancelled before it starts: it writes no result file. Polling sacct, which has no accounting,
    # submitit knew no state and waited for one forever.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    multirun = Multirun(slurm_cluster, tmp_path, dataset_cache, uri, *SHORT,
                        "+hydra.launcher.additional_parameters.hold=true")
    job_id = multirun.wait_for(lambda: slurm_cluster.run("squeue", "--noheader", "--states=PENDING", "--format=%i").strip())
    slurm_cluster.run("scancel", job_id)
    text = multirun.finish(timeout=60)

    assert multirun.process.returncode != 0
    assert f"Job {job_id} (task: 0)" in text and "has not produced any output (state: CANCELLED)" in text
    assert_one_line_about_sacct(text)
