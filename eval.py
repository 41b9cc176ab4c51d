"""Evaluates a run's export later: `python eval.py <run dir or export dir> <task> [<task> ...]` runs lm-evaluation-
harness tasks on the exported model and logs the scores into the run's own MLflow run (its id is in the run dir's
objective.json) when that run is still in the store, else into a new run tagged with the export it evaluated.

Against the base: an adapter export evaluates its base too (the adapter switched off); a full model is compared with
the base results the run itself left (lm_eval_base_results.json) where those cover the same tasks and limit.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.export import ExportNotFound, find_export

ROOT = Path(__file__).resolve().parent


def run_dir_of(export: Path) -> Path:
    return export.parent if export.name == "export" else export


def tracking_uri() -> str:
    """The store train.py logs to by default (conf/logger/mlflow.yaml)."""
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db")


def base_of_run(run_dir: Path, tasks: list[str], limit: int | None) -> dict[str, float] | None:
    """The base scores the run left, where it evaluated the same tasks with the same limit."""
    from tunelab.evaluation.results import BASE_RESULTS_FILE, metric_values

    path = run_dir / BASE_RESULTS_FILE
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    if results.get("config", {}).get("limit") != limit or not set(tasks) <= set(results.get("results", {})):
        return None
    return metric_values(results)


def evaluate_export(path: Path, tasks: list[str], limit: int | None, batch_size: int, num_fewshot: int | None,
                    base: bool) -> None:
    export = find_export(path)  # before torch loads: a wrong path is told at once
    cache_dir = os.environ.get("TUNELAB_CACHE", str(ROOT / ".cache"))
    from tunelab.evaluation.harness import check_tasks
    from tunelab.progress import plain_lines_outside_a_terminal

    plain_lines_outside_a_terminal()

    manager = check_tasks(tasks, cache_dir)
    import torch

    from tunelab.evaluation.harness import evaluate
    from tunelab.evaluation.results import RESULTS_FILE, against_base, metric_values, summary_lines, to_json
    from tunelab.export import load_export

    exported = load_export(export, "cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = exported.model, exported.tokenizer
    results = evaluate(model, tokenizer, manager, tasks, limit, batch_size, num_fewshot)
    metrics = metric_values(results)
    base_metrics = None
    if base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_metrics = metric_values(evaluate(model, tokenizer, manager, tasks, limit, batch_size, num_fewshot))
    elif base:
        base_metrics = base_of_run(run_dir_of(export), tasks, limit)
    logged = {**metrics, **(against_base(metrics, base_metrics) if base_metrics else {})}

    run_id, step = mlflow_run(export, tasks)
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(name, value, now, step) for name, value in logged.items()])
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / RESULTS_FILE
        file.write_text(to_json(results))
        client.log_artifact(run_id, str(file), artifact_path=f"eval_py/{'-'.join(tasks)}")
    print("\n".join(["", "── tunelab eval " + "─" * 47, *summary_lines(metrics, base_metrics, step, limit),
                     f"MLflow run               {run_id}  (store {tracking_uri()})", ""]), flush=True)


def mlflow_run(export: Path, tasks: list[str]) -> tuple[str, int]:
    """(the run's own MLflow run and its last step) where the store still has it, else (a new run tagged with its
    source, 0)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    objective = run_dir_of(export) / "objective.json"
    record = json.loads(objective.read_text()) if objective.is_file() else {}
    if run_id := record.get("mlflow_run_id"):
        try:
            client.get_run(run_id)
            client.set_tag(run_id, "tunelab.evaluated_later", ",".join(tasks))
            return run_id, int(record.get("global_step") or 0)
        except MlflowException:
            pass  # deleted, or another store: a run of its own below
    experiment = client.get_experiment_by_name("tunelab")
    # A local store keeps artifacts where train.py's runs keep theirs (conf/logger/mlflow.yaml), not in ./mlruns.
    local = tracking_uri().startswith(("sqlite:", "file:"))
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "tunelab", artifact_location=str(ROOT / "mlartifacts") if local else None)
    run = client.create_run(experiment_id, run_name=f"eval-{run_dir_of(export).name}",
                            tags={"tunelab.eval_source": str(export.resolve()), "tunelab.eval_tasks": ",".join(tasks)})
    client.set_terminated(run.info.run_id)
    return run.info.run_id, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run dir (its export/ is evaluated) or an export dir")
    parser.add_argument("tasks", nargs="+", help="lm-eval task names (tunelab_tiny, arc_easy, ...), or one comma list")
    parser.add_argument("--limit", default=None, help="at most this many documents a task (default: all)")
    parser.add_argument("--batch-size", default="32", help="prompts a forward pass (default: 32)")
    parser.add_argument("--num-fewshot", default=None, help="shots (default: each task's own)")
    parser.add_argument("--no-base", action="store_true", help="no comparison with the base model")
    args = parser.parse_args()
    tasks = [task for entry in args.tasks for task in entry.split(",") if task]
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and not (value.isdigit() and int(value) >= least):
            sys.exit(f"tunelab: error: {flag}={value} must be a positive whole number" if least else
                     f"tunelab: error: {flag}={value} must be a whole number >= 0")
    limit, num_fewshot = (int(v) if v is not None else None for v in (args.limit, args.num_fewshot))
    try:
        evaluate_export(args.path, tasks, limit, int(args.batch_size), num_fewshot, not args.no_base)
    except (ExportNotFound, ConfigError) as error:
        sys.exit(f"tunelab: error: {error}")


if __name__ == "__main__":
    main()
