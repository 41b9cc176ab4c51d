"""Builds the `logger` group and records what makes a run reproducible: config, command line, git commit."""

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from tunelab.dataset_inputs import DatasetInputLogger
from tunelab.preemption import Preempted, read_record
from tunelab.system_metrics import SystemMetricsLogger
from tunelab.targets import build_target

SECRET_MARKERS = ("token", "password", "secret", "api_key")


def build_logger(cfg: DictConfig) -> Logger | None:
    # Only rank 0 logs. Other ranks build no logger at all: an MLflow client opening a fresh SQL store migrates its
    # schema, and ranks doing that at once fail with "duplicate column" (every rank of a torchrun job starts together).
    if not cfg.logger or rank_zero_only.rank != 0:
        return None
    spec = OmegaConf.to_container(cfg.logger, resolve=True)
    if spec["_target_"].endswith("MLFlowLogger"):
        if not spec["tracking_uri"].startswith(("sqlite:", "file:")) and "://" in spec["tracking_uri"]:
            spec.pop("artifact_location", None)  # a tracking server decides where artifacts go
        spec["tags"] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **git_tags(cfg.paths.root)}
        spec["run_id"] = reopen_preempted_run(spec["tracking_uri"], cfg.paths.output_dir)
    return build_target("logger", spec)  # Lightning's or the user's own Logger subclass (tunelab.targets)


def reopen_preempted_run(tracking_uri: str, run_dir: str) -> str | None:
    """The MLflow run of a run dir whose run was preempted, RUNNING again: its continuation logs into it."""
    run_id = (read_record(run_dir) or {}).get("logger_run_id")
    if run_id:
        MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
    return run_id


def git_tags(root: str) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}
    except (OSError, subprocess.CalledProcessError):
        return {}


def public_config(cfg: DictConfig) -> dict:
    """The resolved config without the `hydra` node and without values whose key names a secret."""

    def scrub(node):
        if isinstance(node, dict):
            return {k: "***" if any(m in k.lower() for m in SECRET_MARKERS) else scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return scrub(container)


def log_run_config(logger: Logger | None, cfg: DictConfig, extra: dict) -> None:
    """Config as (flattened) params, plus the resolved YAML as an artifact of the MLflow run."""
    if logger is None:
        return
    config = public_config(cfg)
    if isinstance(logger, MLFlowLogger) and logger.experiment.get_run(logger.run_id).data.params:
        return  # a preempted run, continued: its params are the first part's (MLflow refuses to change one, run_name's time)
    params = {**config, **extra}
    logger.log_hyperparams(digest_long_values(params) if isinstance(logger, MLFlowLogger) else params)
    if isinstance(logger, MLFlowLogger):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
            logger.experiment.log_artifact(logger.run_id, str(path))


# Lightning's MLFlowLogger cuts a param's value after 250 characters (MLflow's own limit is 6000).
PARAM_LIMIT = 250


def digest_long_values(node):
    """A value too long for an MLflow param (an inline model.chat_template, many data.sources) as the digest of its
    whole text, `sha256:<16 hex digits>`, which tells runs apart where a cut value could not; config.yaml holds it."""
    if isinstance(node, dict):
        return {key: digest_long_values(value) for key, value in node.items()}
    text = str(node)
    if len(text) <= PARAM_LIMIT:
        return node
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]} (whole in config.yaml)"


def log_run_artifact(logger: Logger | None, path: Path) -> None:
    if isinstance(logger, MLFlowLogger) and path.exists():
        logger.experiment.log_artifact(logger.run_id, str(path))


def mark_failed(logger: Logger | None) -> None:
    """Ends the MLflow run as FAILED when a run dies outside trainer.fit (which finalizes by itself)."""
    if isinstance(logger, MLFlowLogger) and logger._run_id is not None:
        end_run_failed(logger._tracking_uri, logger.run_id)


def mark_preempted(logger: Logger | None, preempted: Preempted) -> None:
    """Ends the MLflow run KILLED, with tag tunelab.preempted (signal and step); its continuation reopens it."""
    if isinstance(logger, MLFlowLogger) and logger._run_id is not None:
        client = MlflowClient(logger._tracking_uri)
        client.set_tag(logger.run_id, "tunelab.preempted", str(preempted))
        client.set_terminated(logger.run_id, "KILLED")


def end_run_failed(tracking_uri: str, run_id: str, reason: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        if reason:
            client.set_tag(run_id, "tunelab.failure", reason[:5000])
        client.set_terminated(run_id, "FAILED")


class FailedRunMarker(pl.Callback):
    """Lets whichever rank fails end the MLflow run as FAILED. Only rank 0 holds the run, and when another rank
    fails, rank 0 is left waiting in a collective until it is killed: so rank 0 shares the run id at setup."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.run_id = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = trainer.logger
        own = logger.run_id if trainer.is_global_zero and isinstance(logger, MLFlowLogger) else None
        self.run_id = trainer.strategy.broadcast(own)  # every rank takes part

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.run_id is not None and not isinstance(exception, Preempted):
            end_run_failed(self.tracking_uri, self.run_id, reason=f"{type(exception).__name__}: {exception}")


def logger_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Callbacks every rank needs for the configured logger (built from the config: ranks other than 0 have none);
    those that log act where the logger is."""
    if cfg.logger and cfg.logger._target_.endswith("MLFlowLogger"):
        system_metrics = SystemMetricsLogger(cfg.get("system_metrics", "auto"), cfg.logger.tracking_uri)
        return [FailedRunMarker(cfg.logger.tracking_uri), DatasetInputLogger(), system_metrics]
    return []
