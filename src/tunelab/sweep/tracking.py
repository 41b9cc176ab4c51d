"""A study sweep in MLflow: one parent run per study, each trial's run nested under it and tagged with its state."""

import logging
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from tunelab.sweep.trial import PARENT_RUN_ATTR, PRUNED_ATTR, REPLACES_ATTR, RUN_ATTR  # noqa: E402

log = logging.getLogger(__name__)

# An MLflow run has no PRUNED status; KILLED (stopped on purpose) is the closest, the tag says which.
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
PARENT_WAIT_S = 60
PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
}


class StudyRun:
    """The parent MLflow run of one study, shared by every worker and every resumed sweep of that study."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id

    @classmethod
    def open(cls, config: DictConfig, study: optuna.Study, created: bool, search_space: dict, storage: str):
        """The study's parent run (made by whoever created the study), or None when the job logs no MLflow run."""
        if not config.get("logger") or not str(config.logger.get("_target_", "")).endswith("MLFlowLogger"):
            return None
        uri = config.logger.tracking_uri
        client = MlflowClient(uri)
        experiment_id = experiment(client, config.logger.experiment_name, uri, config.logger.get("artifact_location"))
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None and not created and not study.get_trials(deepcopy=False):
            run_id = wait_for_parent(study)
        if run_id is None:
            tags = {"mlflow.runName": study.study_name, "optuna.study_name": study.study_name, "optuna.storage": storage}
            run_id = client.create_run(experiment_id, tags=tags).info.run_id
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
            for name, distribution in search_space.items():
                client.log_param(run_id, f"search.{name}", repr(distribution))
        else:
            client.update_run(run_id, status="RUNNING")
        run = cls(client, experiment_id, run_id)
        run.log_text(OmegaConf.to_yaml({k: repr(v) for k, v in search_space.items()}), "search_space.yaml")
        return run

    def record_trial(self, trial: FrozenTrial) -> None:
        """Tags the trial's run with its final state and ends it; a trial that died before it had a run gets one."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.run_id, "mlflow.runName": f"trial-{trial.number}"}
            run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
            for name, value in trial.params.items():
                self.client.log_param(run_id, name, value)
        tags = {"optuna.trial_number": str(trial.number), "optuna.trial_state": trial.state.name}
        if "failure" in trial.user_attrs:
            tags["optuna.failure"] = trial.user_attrs["failure"][:4000]
        elif trial.state == TrialState.FAIL:
            tags["optuna.failure"] = "interrupted: its worker was stopped or lost; a later trial re-runs its params"
        if REPLACES_ATTR in trial.user_attrs:
            tags["optuna.replaces_trial"] = str(trial.user_attrs[REPLACES_ATTR])
        if PRUNED_ATTR in trial.user_attrs:
            tags["optuna.pruned_at_step"] = str(trial.user_attrs[PRUNED_ATTR])
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        if trial.state == TrialState.COMPLETE:
            self.client.log_metric(run_id, "objective", trial.value)
        self.client.set_terminated(run_id, RUN_STATUS.get(trial.state, "FAILED"))

    def record_best(self, study: optuna.Study, summary: dict) -> None:
        if summary.get("best_value") is not None:
            self.client.log_metric(self.run_id, "best_value", summary["best_value"], step=summary["best_trial"])
            for name, value in summary["best_params"].items():
                self.client.set_tag(self.run_id, f"best.{name}", str(value))
        self.log_text(OmegaConf.to_yaml(summary), "best.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            for name, plot in PLOTS.items():
                path = Path(tmp) / f"{name}.png"
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        axes = plot(study)
                    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
                    figure.set_size_inches(10, 6)
                    figure.tight_layout()
                    figure.savefig(path, dpi=100)
                    plt.close(figure)
                except (ValueError, RuntimeError, ZeroDivisionError) as error:
                    # Importances need at least two finished trials that differ; an early sweep may not have them.
                    log.warning("no %s plot: %s", name, error)
                    continue
                self.client.log_artifact(self.run_id, str(path), "plots")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)


def experiment(client: MlflowClient, name: str, uri: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    try:
        return client.create_experiment(name, artifact_location=artifact_location if local_store else None)
    except MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def wait_for_parent(study: optuna.Study) -> str | None:
    """The parent run id the study's creator stores; it may still be on its way when workers start together."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while (run_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None and time.monotonic() < deadline:
        time.sleep(1)
    return run_id
