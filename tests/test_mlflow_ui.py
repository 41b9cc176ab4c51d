"""What a user sees in the MLflow UI (headless Chromium): at the address `make ui` prints, a run's own name and its
datasets in the runs table; a sweep as one parent run with its trials nested under it."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tunelab.mlflow_ui import main as print_ui_address

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


def page_text(dom: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_runs_table_at_the_printed_address_shows_the_run_name_and_its_datasets(tmp_path, dataset_cache, mlflow_server,
                                                                                capsys):
    env = {**os.environ, "TUNELAB_CACHE": str(dataset_cache), "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    run_dir = tmp_path / "outputs" / "${now:%H-%M-%S-%f}"  # Hydra's own pattern: the run name takes the same time
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "experiment_name=ui-run",
         "trainer.max_steps=6", "trainer.val_check_interval=3", "data.num_examples=200", "callbacks=none",
         "export=false", "system_metrics=true"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )
    (run_dir,) = (tmp_path / "outputs").iterdir()
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ui-run").experiment_id])
    assert run.info.run_name == f"tiny-tiny-none-{run_dir.name}"
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"} and inputs["training"].name == "tiny-task"
    assert "system/cpu_utilization_percentage" in run.data.metrics  # system_metrics=true on a CPU run

    print_ui_address(["--store", mlflow_server, "--ui", mlflow_server, "--experiment", "ui-run"])  # as `make ui` does
    url = capsys.readouterr().out.split()[-1]
    assert url.startswith(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs")
    text = page_text(rendered_page(url, str(tmp_path / "runs.png")))
    # The experiment's runs table (not MLflow 3's GenAI home page), with the run's full name in its row.
    assert "Run Name" in text and "Dataset" in text and "1 matching run" in text and run.info.run_name in text
    for context, dataset in inputs.items():  # the Dataset column: name (digest) and what it was used for
        assert f"tiny-task ({dataset.digest}) {context}" in text
    assert (tmp_path / "runs.png").stat().st_size > 20_000


def test_sweep_shows_as_one_parent_with_nested_trials(tmp_path, dataset_cache, mlflow_server):
    env = {**os.environ, "TUNELAB_CACHE": str(dataset_cache), "MLFLOW_TRACKING_URI": mlflow_server}
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", "hydra.sweeper.n_trials=2",
         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'multirun' / '${now:%H-%M-%S-%f}'}",
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
    # Trials share the sweep's time in their run name, and each adds its number.
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    assert sorted(c.info.run_name for c in children) == [f"tiny-tiny-lora-{sweep_dir.name}-trial{n}" for n in (0, 1)]

    dom = rendered_page(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs", str(tmp_path / "ui.png"))
    text = page_text(dom)
    assert "3 matching runs" in text
    assert f"runs/{parent.info.run_id}" in dom and parent.info.run_name in dom
    # Collapsed under their parent: the trials are counted but get no rows of their own.
    assert not any(f"runs/{child.info.run_id}" in dom for child in children)
    assert (tmp_path / "ui.png").stat().st_size > 20_000
