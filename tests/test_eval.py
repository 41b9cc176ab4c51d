"""Benchmark evaluation (eval=tiny): lm-evaluation-harness on the trained model, in the run's MLflow run, beside the
base model, as a sweep's objective, after the fact (eval.py), under DDP, and its bad inputs. The real harness on
tunelab's shipped tasks, offline."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, compose_config, mlflow_runs, run_train, subprocess_env
from tunelab.config import ConfigError, validate_config

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TASKS = ["tunelab_tiny", "tunelab_tiny_choice"]
# Enough steps and rows for greedy answers to start coming out right (seen: exact match 0.125 against the base's 0,
# where 1,000 rows gave 0.025); 40 documents a task.
TRAINED = ["eval=tiny", "eval.limit=40", "trainer.max_steps=300", "trainer.val_check_interval=150",
           "callbacks.progress_bar=null", "callbacks.samples=null"]


def metrics_of(tracking_uri: str, run_id: str) -> dict[str, float]:
    return MlflowClient(tracking_uri).get_run(run_id).data.metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_cache):
    """One run of the embedded job with eval=tiny: its run dir, MLflow store and run id."""
    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = run_train(TRAINED, tmp / "run", dataset_cache, tracking_uri=uri, extra_env=OFFLINE)
    record = json.loads((tmp / "run" / "objective.json").read_text())
    return {"dir": tmp / "run", "uri": uri, "run_id": record["mlflow_run_id"], "stdout": result.stdout,
            "step": record["global_step"]}


def test_scores_in_mlflow_equal_the_harness_on_the_export(trained, dataset_cache):
    """What the run logged for the model in memory is what lm_eval itself scores for the exported model directory."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tunelab.evaluation.local_tasks import task_dir
    from tunelab.evaluation.results import metric_values

    logged = metrics_of(trained["uri"], trained["run_id"])
    direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={trained['dir'] / 'export'}", tasks=TASKS,
                                     limit=40, batch_size=32, device="cpu", log_samples=False,
                                     task_manager=TaskManager(include_path=str(task_dir(dataset_cache))))
    expected = metric_values(direct)
    assert set(expected) == {f"eval/{t}/{m}" for t, m in [("tunelab_tiny", "exact_match"), ("tunelab_tiny_choice", "acc")]
                             for m in (m, f"{m}_stderr")}
    assert {name: logged[name] for name in expected} == pytest.approx(expected, abs=1e-9)
    # The harness's results JSON is an artifact of the run, and the summary has a line per task.
    artifacts = {a.path for a in MlflowClient(trained["uri"]).list_artifacts(trained["run_id"])}
    assert {"lm_eval_results.json", "lm_eval_base_results.json"} <= artifacts
    saved = json.loads((trained["dir"] / "lm_eval_results.json").read_text())
    assert metric_values(saved) == pytest.approx(expected, abs=1e-9)
    assert f"eval (step {trained['step']})" in trained["stdout"]
    for task in TASKS:
        assert f"\n  {task}/" in trained["stdout"]


def test_trained_model_beats_its_base_and_the_delta_is_logged(trained, dataset_cache):
    logged = metrics_of(trained["uri"], trained["run_id"])
    exact, choice = "eval/tunelab_tiny/exact_match", "eval/tunelab_tiny_choice/acc"
    assert logged[f"{exact}/base"] == 0.0  # a random model answers nothing right
    for name, gain in [(exact, 0.1), (choice, 0.5)]:  # seen: +0.125 (5 of 40 documents) and +0.75
        assert logged[f"{name}/delta"] == pytest.approx(logged[name] - logged[f"{name}/base"])
        assert logged[f"{name}/delta"] >= gain, {k: v for k, v in logged.items() if k.startswith("eval/")}
    # The base was evaluated once and cached by its identity, tasks and limit.
    assert len(list((dataset_cache / "eval_base").glob("*.json"))) >= 1


def test_eval_py_logs_into_the_runs_own_mlflow_run(trained, tmp_path):
    def eval_py(*args: str, uri: str = trained["uri"]) -> subprocess.CompletedProcess:
        env = {**subprocess_env(tmp_path, tmp_path / "cache", uri), **OFFLINE}
        return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    result = eval_py(str(trained["dir"]), "tunelab_tiny_choice", "--limit", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained["run_id"] in result.stdout
    client = MlflowClient(trained["uri"])
    history = client.get_metric_history(trained["run_id"], "eval/tunelab_tiny_choice/acc")
    assert len(history) == 2 and {m.step for m in history} == {trained["step"]}  # the run's own, and eval.py's
    assert client.get_run(trained["run_id"]).data.tags["tunelab.evaluated_later"] == "tunelab_tiny_choice"
    # A store without the run: a new run, tagged with the export it evaluated.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    result = eval_py(str(trained["dir"] / "export"), "tunelab_tiny", "--limit", "5", "--no-base", uri=other)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = mlflow_runs(other)[0]
    assert run.data.tags["tunelab.eval_source"] == str((trained["dir"] / "export").resolve())
    assert "eval/tunelab_tiny/exact_match" in run.data.metrics
    # A wrong path, a bad limit: one line.
    for args, says in [((str(tmp_path), "tunelab_tiny"), "no exported model there"),
                       ((str(trained["dir"]), "tunelab_tiny", "--limit", "0"), "--limit=0 must be a positive")]:
        result = eval_py(*args)
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("tunelab: error:")
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, result.stderr


def test_sweep_optimises_the_eval_metric(tmp_path, dataset_cache):
    """Each trial's objective is the best value its run logged for the eval metric: what the sweep optimised."""
    metric = "eval/tunelab_tiny_choice/acc"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", f"hydra.sweeper.storage={storage}",
               "hydra.sweeper.study_name=test", f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.sweeper.n_trials=4",
               "hydra/sweeper/pruner=none", "trainer.max_steps=10", "trainer.val_check_interval=5",
               "data.num_examples=200", "callbacks=none", "export=false", "trainer.log_every_n_steps=5",
               "eval=tiny", "eval.tasks=[tunelab_tiny_choice]", "eval.limit=30", "eval.every_n_validations=1",
               f"objective.metric={metric}", "objective.mode=max"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(command, cwd=ROOT, env={**subprocess_env(tmp_path, dataset_cache, uri), **OFFLINE},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    trials = optuna.load_study(study_name="test", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    client = MlflowClient(uri)
    children = {int(c.data.tags["optuna.trial_number"]): c for c in mlflow_runs(uri)[1]}
    for trial in trials:
        history = sorted(client.get_metric_history(children[trial.number].info.run_id, metric), key=lambda m: m.step)
        assert len(history) == 2  # at each validation (steps 5 and 10), where the pruner reads it
        assert trial.value == max(m.value for m in history)
        assert [value for _, value in sorted(trial.intermediate_values.items())] == [m.value for m in history]
    assert len({t.value for t in trials}) > 1  # the metric tells the trials apart


def test_ddp_on_two_processes_scores_what_one_process_does(tmp_path, dataset_cache):
    """Two ranks each evaluate half the documents and rank 0 gathers them: the same scores as one process, for the
    base (the same weights) and for the model trained on the same global batch."""
    small = ["eval=tiny", "eval.limit=30", "trainer.max_steps=8", "trainer.val_check_interval=8",
             "data.num_examples=300", "callbacks.progress_bar=null", "callbacks.early_stopping=null", "export=false",
             "logger=none"]
    results = {}
    for name, args in [("one", ["data.batch_size=16"]),
                       ("two", ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=8"])]:
        cache = tmp_path / f"cache-{name}"  # each its own: the base is evaluated, not read from the other's cache
        run_train([*small, *args], tmp_path / name, cache, extra_env=OFFLINE)
        results[name] = {file: json.loads((tmp_path / name / file).read_text())["results"]
                         for file in ("lm_eval_base_results.json", "lm_eval_results.json")}
    for file in results["one"]:
        for task in TASKS:
            one, two = results["one"][file][task], results["two"][file][task]
            assert {k: v for k, v in two.items() if k != "alias"} == pytest.approx(
                {k: v for k, v in one.items() if k != "alias"}, abs=1e-9), (file, task)


@pytest.mark.parametrize("args, says", [
    (["eval=none", "objective.metric=eval/tunelab_tiny/exact_match", "objective.mode=max"],
     "objective.metric=eval/tunelab_tiny/exact_match is a benchmark score, and benchmark evaluation is off"),
    (["eval.limit=0"], "eval.limit=0 must be >= 1"),
    (["eval.limit=some"], "eval.limit=some must be an integer >= 1 or null"),
    (["eval.limit=-3"], "eval.limit=-3 must be >= 1"),
    (["objective.metric=eval/tunelab_tiny/exact_match"], "set eval.every_n_validations=1"),
    (["objective.metric=eval/arc_easy/acc", "eval.every_n_validations=1"], "task arc_easy is not in eval.tasks"),
])
def test_bad_eval_config_ends_in_one_line(tmp_path, dataset_cache, args, says):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["eval=tiny", *args], tmp_path, dataset_cache))
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("args, says", [
    (["eval.tasks=[no_such_task]"], "eval.tasks: no lm-eval task named no_such_task"),
    (["objective.metric=eval/tunelab_tiny/acc", "eval.every_n_validations=1"],
     "objective.metric=eval/tunelab_tiny/acc: task tunelab_tiny scores exact_match, not acc"),
])
def test_unknown_task_or_metric_is_told_before_training(tmp_path, dataset_cache, args, says):
    """What only the harness knows (its task names, what a task scores), asked before any weights load."""
    from tunelab.evaluation.callback import build_evaluation

    cfg = compose_config(["eval=tiny", *args], tmp_path, dataset_cache)
    validate_config(cfg)
    with pytest.raises(ConfigError) as error:
        build_evaluation(cfg, tokenizer=None)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_hub_task_without_network_ends_in_one_line(tmp_path, dataset_cache):
    """Through the real train.py: one `tunelab: error:` line, no traceback, nothing trained."""
    result = run_train(["eval=tiny", "eval.tasks=[arc_easy]"], tmp_path / "run", dataset_cache, check=False,
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", extra_env=OFFLINE)
    lines = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert "eval.tasks=arc_easy: the task data cannot be loaded" in lines[0] and "hub tasks need the network" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_auto_evaluates_the_embedded_task_only_and_says_so_elsewhere(tmp_path, dataset_cache, monkeypatch, caplog):
    """The default eval=auto: eval=tiny's evaluation on data=tiny (tests/test_default_job.py: the run), off with one
    info line on other data or without lm_eval; the run then builds no evaluation. Explicit options never turn off."""
    from tunelab.evaluation.callback import build_evaluation

    monkeypatch.setenv("TUNELAB_EVAL_AUTO", "embedded")
    caplog.set_level(logging.INFO, logger="tunelab.config")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "echo", "input": "a", "output": "a"}\n')
    jsonl = ["data=jsonl", f"data.path={rows}"]

    def resolved(args: list[str]) -> tuple:
        caplog.clear()
        cfg = compose_config(args, tmp_path, dataset_cache)
        validate_config(cfg)
        return cfg, [r.getMessage() for r in caplog.records if r.getMessage().startswith("benchmark evaluation")]

    cfg, said = resolved([])
    assert cfg.eval == compose_config(["eval=tiny"], tmp_path, dataset_cache).eval and said == []
    cfg, said = resolved(jsonl)
    assert said == ["benchmark evaluation off: eval=auto evaluates the embedded task (data=tiny) only, not "
                    "data.source=jsonl; eval=hub eval.tasks=[arc_easy] for lm-eval's own tasks"]
    assert not cfg.eval and build_evaluation(cfg, tokenizer=None) == []
    assert resolved(["data=tiny_chat"])[1][0].endswith("not data.source=tiny_chat; eval=hub eval.tasks=[arc_easy] "
                                                       "for lm-eval's own tasks")
    with pytest.raises(ConfigError, match=r"^objective.metric=eval/tunelab_tiny/acc is a benchmark score, and benchmark "
                                          r"evaluation is off \(eval=auto evaluates the embedded task only, not "
                                          r"data.source=jsonl\): pick"):
        resolved([*jsonl, "objective.metric=eval/tunelab_tiny/acc"])
    monkeypatch.setenv("TUNELAB_EVAL_AUTO", "off")  # asked for: off without a word
    cfg, said = resolved([])
    assert not cfg.eval and said == []
    with pytest.raises(ConfigError, match=r"^eval.auto=maybe is not one of: embedded, off \(TUNELAB_EVAL_AUTO sets it\)$"):
        resolved(["eval.auto=maybe"])

    monkeypatch.setenv("TUNELAB_EVAL_AUTO", "embedded")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as where it is not installed: find_spec answers None
    cfg, said = resolved([])
    assert not cfg.eval and said == ["benchmark evaluation off: lm_eval is not installed (pip install "
                                     "'tunelab[eval]' to evaluate the embedded task)"]
    for option in ("tiny", "hub"):
        with pytest.raises(ConfigError, match=r"^eval needs the lm_eval package: pip install 'tunelab\[eval\]'"):
            resolved([f"eval={option}"])



def test_auto_says_it_is_off_once_per_job_not_once_per_ddp_rank(tmp_path, dataset_cache, monkeypatch, caplog):
    """Every rank of a DDP job composes and validates the config; only the first says why evaluation is off. The
    other ranks are told apart as Lightning's launcher (LOCAL_RANK), torchrun (RANK) and SLURM start them."""
    monkeypatch.setenv("TUNELAB_EVAL_AUTO", "embedded")
    caplog.set_level(logging.INFO, logger="tunelab.config")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "echo", "input": "a", "output": "a"}\n')

    def said(rank: dict[str, str]) -> int:
        caplog.clear()
        for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in rank.items():
            monkeypatch.setenv(name, value)
        validate_config(compose_config(["data=jsonl", f"data.path={rows}", "strategy=ddp", "trainer.accelerator=cpu",
                                        "trainer.devices=2"], tmp_path, dataset_cache))
        return sum(r.getMessage().startswith("benchmark evaluation off") for r in caplog.records)

    assert said({}) == 1  # the launching process, rank 0
    assert said({"LOCAL_RANK": "1"}) == said({"RANK": "1"}) == said({"SLURM_PROCID": "3"}) == 0

def test_shipped_rows_are_held_out_from_the_default_job(tmp_path):
    from tunelab.evaluation.local_tasks import TASKS_DIR, held_out_rows

    shipped = [json.loads(line) for line in (TASKS_DIR / "tunelab_tiny.jsonl").read_text().splitlines()]
    assert shipped == held_out_rows(cache_dir=tmp_path)  # the file is what the generator writes
    from tunelab.tiny_task import write_tiny_task

    trained_on = {(r["instruction"], r["input"]) for r in map(json.loads, write_tiny_task(tmp_path, 4000, 1234).open())}
    assert not trained_on & {(r["instruction"], r["input"]) for r in shipped}


def test_a_resumed_lora_run_with_no_cached_base_scores_its_base_with_the_adapter_off(tmp_path):
    """Where no base results are cached, a resumed LoRA run scores its base by switching its trained adapter off: the
    scores the first run had of its base, not those of the adapter it resumes with."""
    import shutil

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    lora = ["peft=lora", "eval=tiny", "eval.tasks=[tunelab_tiny_choice]", "eval.limit=30", "trainer.val_check_interval=10",
            "data.num_examples=300", "callbacks.progress_bar=null", "callbacks.samples=null", "callbacks.early_stopping=null",
            "export=false", "logger=none", "validate_at_start=false"]

    def scores(name: str) -> dict:
        return {k: v for k, v in json.loads((run_dir / name).read_text())["results"]["tunelab_tiny_choice"].items()
                if k != "alias"}

    run_train([*lora, "trainer.max_steps=10"], run_dir, cache, extra_env=OFFLINE)
    base, adapted = scores("lm_eval_base_results.json"), scores("lm_eval_results.json")
    assert adapted["acc,none"] != base["acc,none"]  # the adapter it resumes with scores otherwise
    shutil.rmtree(cache / "eval_base")
    (run_dir / "lm_eval_base_results.json").unlink()
    resumed = run_train([*lora, "trainer.max_steps=12", "ckpt_path=last"], run_dir, cache, extra_env=OFFLINE)
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert scores("lm_eval_base_results.json") == pytest.approx(base, abs=1e-9)
