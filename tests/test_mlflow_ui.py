"""What a user sees in the MLflow UI: a sweep is one parent run, its trials nested under it (headless Chromium)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

pytest_plugins = ["tests.services"]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=25000"]


def rendered_page(url: str, screenshot: str) -> str:
    """The DOM after the page's scripts ran, and a screenshot of it for a person to look at."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not found: run `make services` (or `apt-get install -y chromium`)", pytrace=False)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120)
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120).stdout


def test_sweep_shows_as_one_parent_with_nested_trials(tmp_path, dataset_cache, mlflow_server):
    env = {**os.environ, "TUNELAB_CACHE": str(dataset_cache), "MLFLOW_TRACKING_URI": mlflow_server}
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", "hydra.sweeper.n_trials=2",
         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
         "experiment_name=ui-check", "trainer.max_steps=6", "trainer.val_check_interval=3", "data.num_examples=200",
         "callbacks=none", "export=false"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ui-check")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2

    dom = rendered_page(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs", str(tmp_path / "ui.png"))
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert "3 matching runs" in text
    assert f"runs/{parent.info.run_id}" in dom and parent.info.run_name in dom
    # Collapsed under their parent: the trials are counted but get no rows of their own.
    assert not any(f"runs/{child.info.run_id}" in dom for child in children)
    assert (tmp_path / "ui.png").stat().st_size > 20_000
