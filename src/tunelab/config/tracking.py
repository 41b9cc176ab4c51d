"""The logger group: an MLflow tracking server must answer before anything loads."""

import socket
from urllib.parse import urlsplit

from omegaconf import DictConfig

from tunelab.errors import ConfigError


def without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


def check_tracking_server(cfg: DictConfig) -> None:
    """An MLflow tracking server must answer before anything loads: MLflow's client would otherwise retry each request
    with back-off for minutes, after the model had loaded. Only a connection is tried (seconds at most)."""
    logger = cfg.get("logger")
    if not logger or not str(logger.get("_target_", "")).endswith("MLFlowLogger"):
        return
    uri = str(logger.tracking_uri)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # a local store (sqlite:, file:) or a managed one (databricks) that MLflow reaches its own way
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout=5):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"the MLflow tracking server at {without_credentials(uri)} does not answer ({reason}): start it "
                          "(make ui, or mlflow server), point MLFLOW_TRACKING_URI at one that runs, or use logger=csv") from error
