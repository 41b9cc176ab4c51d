"""The default job (`python train.py`) trains the embedded model on the embedded task, learns, and is tracked."""

import math

import mlflow
import pytest
import yaml

from tests.conftest import EVAL_AUTO_ON, run_train


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, dataset_cache):
    base = tmp_path_factory.mktemp("default")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    # stdout is a pipe: plain progress lines. The default eval=auto on, as outside the tests (no network asked for).
    result = run_train([], base / "run", dataset_cache, tracking_uri=uri, extra_env=EVAL_AUTO_ON)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert len(runs) == 1
    return result, client, runs[0], base / "run"


def test_default_job_learns(default_run):
    _, client, run, _ = default_run
    val_loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    exact = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/exact_match"), key=lambda m: m.step)]
    assert len(val_loss) >= 3
    assert val_loss[-1] <= 0.5 * val_loss[0], val_loss
    assert exact[-1] > exact[0] and exact[-1] >= 0.1, exact


def test_mlflow_run_records_config_metrics_and_artifacts(default_run):
    _, client, run, run_dir = default_run
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim/lr"] == "0.003"
    assert params["model/config/hidden_size"] == "192"
    assert int(params["trainable_params"]) == int(params["total_params"]) > 1_000_000
    assert "git_commit" in run.data.tags and run.data.tags["command"].startswith("train.py")
    for metric in ("train/loss", "val/loss", "val/exact_match", "train/tokens_per_s", "grad_norm/decay", "objective"):
        assert metric in run.data.metrics, metric
    assert any(key.startswith("lr-") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curves.png"} <= artifacts
    config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml")))
    assert config["model"]["config"]["hidden_size"] == 192 and "hydra" not in config


def test_summary_names_losses_checkpoint_and_run(default_run):
    result, _, run, run_dir = default_run
    summary = result.stdout[result.stdout.index("tunelab run summary"):]
    for line in ("val/loss (last)", "val/exact_match (last)", "best checkpoint", run.info.run_id, "make ui"):
        assert line in summary
    best = float(summary.split("objective val/loss (min)")[1].split()[0])
    assert math.isclose(best, run.data.metrics["objective"], abs_tol=5e-5)  # the summary prints 4 decimals
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "loss_curves.png").stat().st_size > 10_000


def test_summary_leaves_out_a_loss_no_step_logged():
    """A run shorter than trainer.log_every_n_steps logs no training step, one without validation no val/loss: the
    summary says nothing of them rather than `nan`."""
    from tunelab.callbacks import ObjectiveTracker
    from tunelab.report import summary_lines

    tracker = ObjectiveTracker("val/loss", "min")
    tracker.validations.append({"step": 4, "val/loss": 3.7141})
    lines = summary_lines(tracker, 3.7141, None, None, None, None)
    assert "val/loss (last)          3.7141" in lines and not any("nan" in line for line in lines)
    assert not any(line.startswith("train/loss") for line in lines)
    tracker.train_loss.append((10, 0.2639))
    tracker.validations.clear()
    lines = summary_lines(tracker, float("inf"), None, None, None, None)
    assert lines[0] == "train/loss (last step)   0.2639" and not any(line.startswith("val/loss") for line in lines)


def test_progress_outside_a_terminal_is_plain_lines(default_run):
    """In CI, nohup or a SLURM job's output, a rich bar's redraws would leave fragments of lines."""
    result, _, run, _ = default_run
    training = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(training) >= 10, result.stdout[-3000:]
    assert training[-1].startswith("step 600/600  train/loss ") and "train/tokens_per_s " in training[-1]
    assert any(" eta 0:" in line for line in training)
    validations = [line for line in result.stdout.splitlines() if line.startswith("validation at step 600: ")]
    assert len(validations) == 1 and "val/loss " in validations[0]
    assert "\x1b[" not in result.stdout  # no cursor moves or colours
    # lm-eval's request bars, on stderr: the line each ends on, not its redraws (read here as lines of their own)
    bars = [line for line in result.stderr.splitlines() if "it/s]" in line]
    assert bars and all("100%|" in line for line in bars), bars[:5]


def test_a_library_progress_bar_in_a_log_is_the_one_line_it_ends_on():
    import io

    from tqdm import tqdm

    from tunelab.progress import PlainLines

    log = io.StringIO()
    stream = PlainLines(log)
    stream.write("a warning\n")
    for _ in tqdm(range(12), desc="Running loglikelihood requests", file=stream, mininterval=0, ascii=True):
        pass
    lines = log.getvalue().split("\n")
    assert lines[0] == "a warning" and lines[2] == "" and len(lines) == 3
    assert lines[1].startswith("Running loglikelihood requests: 100%|##########| 12/12 [") and "\r" not in lines[1]


def test_default_job_scores_the_embedded_task_beside_its_base(default_run):
    """eval=auto, the default: lm-eval's scores of the trained model and its base in the run, and in the summary."""
    result, _, run, run_dir = default_run
    metrics = run.data.metrics
    for name, gain in [("eval/tunelab_tiny/exact_match", 0.1), ("eval/tunelab_tiny_choice/acc", 0.3)]:
        assert {f"{name}_stderr", f"{name}/base"} <= set(metrics), sorted(metrics)
        assert metrics[f"{name}/delta"] == pytest.approx(metrics[name] - metrics[f"{name}/base"])
        assert metrics[f"{name}/delta"] > gain, metrics  # measured: +0.47 and +0.68 (BENCHMARKS.md)
    assert (run_dir / "lm_eval_results.json").is_file()
    summary = result.stdout[result.stdout.index("tunelab run summary"):]
    assert "eval (step 600)" in summary and "\n  tunelab_tiny_choice/acc " in summary
