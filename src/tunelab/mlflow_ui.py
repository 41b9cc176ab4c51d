"""Where the MLflow UI lists tunelab's training runs. MLflow 3 opens on its GenAI home page; an experiment's training
runs are at `#/experiments/<id>/runs`, and `workflowType=machine_learning` turns the UI's side bar to model training
(Runs, Models) from GenAI (Traces, Prompts). `make ui` prints that address before it starts the server:

    python -m tunelab.mlflow_ui --store sqlite:///.../mlflow.db --ui http://127.0.0.1:5000 [--experiment tunelab]
"""

import argparse
from pathlib import Path


def runs_table_url(ui: str, experiment_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def find_experiment_id(store: str, name: str) -> str | None:
    """The id of the active experiment `name` in the store, or None; a SQLite store that is not there yet stays so."""
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        return None
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(store).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None and experiment.lifecycle_stage == "active" else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the tracking store the UI serves (its backend store URI)")
    parser.add_argument("--ui", required=True, help="the UI's own address, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="tunelab", help="the experiment (train.py's experiment_name)")
    args = parser.parse_args(argv)
    experiment_id = find_experiment_id(args.store, args.experiment)
    if experiment_id is None:
        print(f"no experiment {args.experiment!r} in this store yet: after a first run, `make ui` prints the address "
              f"of its runs table (the UI: {args.ui})")
    else:
        print(f"{args.experiment} training runs: {runs_table_url(args.ui, experiment_id)}")


if __name__ == "__main__":
    main()
