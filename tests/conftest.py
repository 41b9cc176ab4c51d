"""Shared helpers: compose the real config, and run the real `train.py` in a subprocess on the embedded default."""

import atexit
import csv
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The default eval=auto would evaluate every run on the embedded task (lm-eval's import and two tasks, ~5 s CPU each):
# off for every train.py the tests start and every config they compose; a test of the evaluation asks for it.
os.environ["TUNELAB_EVAL_AUTO"] = "off"
EVAL_AUTO_ON = {"TUNELAB_EVAL_AUTO": "embedded"}

# Keep test runs short and quiet; each test adds what it is about.
FAST = ["trainer.max_steps=20", "trainer.val_check_interval=10", "data.num_examples=400", "callbacks.progress_bar=null"]


# The files that take longest, longest first. `make test` hands whole files to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder), each worker taking the next file as it runs out: long files first leave
# short ones to fill the end. xdist's own order (files with the most tests first) left the few-test long files (the
# default job, the two-turn chat runs, SLURM) to the end, where one worker ran on alone (BENCHMARKS.md, the suite in
# 15 minutes). Files not named keep their order, after these.
LONGEST_FIRST = ["test_dpo.py", "test_eval.py", "test_chat.py", "test_grpo.py", "test_resume.py", "test_sweep.py",
                 "test_default_job.py", "test_sweep_dispatch.py", "test_streaming_runs.py",
                 "test_slurm.py", "test_scale_out.py", "test_pruning_signals.py", "test_fsdp2.py", "test_divergence.py",
                 "test_preemption.py", "test_generation.py", "test_mixing.py", "test_fast_path.py", "test_mlflow_ui.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay in their order


@pytest.fixture(scope="module")
def replay():
    """benchmarks/pruning_replay.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("pruning_replay", ROOT / "benchmarks" / "pruning_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory) -> Path:
    """One datasets cache for the session, so the tiny task is generated and tokenized once."""
    return tmp_path_factory.mktemp("cache")


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `train.py` would get, with the run-time paths a Hydra run would fill in."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


_EMPTY_STORE: list[Path] = []


def empty_mlflow_store(uri: str) -> str:
    """`uri` itself. Where it names a SQLite file not yet there, the file starts as a copy of an empty store MLflow made
    once per test process: MLflow's creation of a store (its schema migrations) takes seconds per store (21 s beside
    other work on the 2-core machine, 0.4 s to open a copy), and nearly every test run starts a store of its own."""
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or path.exists() or not path.parent.is_dir():
        return uri
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        directory = Path(tempfile.mkdtemp(prefix="tunelab-empty-mlflow-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").search_experiments()  # MLflow creates its tables
        _EMPTY_STORE.append(directory / "mlflow.db")
    shutil.copyfile(_EMPTY_STORE[0], path)
    return uri


def subprocess_env(tmp_path: Path, cache_dir: Path, tracking_uri: str | None = None) -> dict:
    """The environment of a train.py subprocess: the shared datasets cache, and an MLflow store under tmp_path."""
    return {**os.environ, "TUNELAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1",
            "MLFLOW_TRACKING_URI": empty_mlflow_store(tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}")}


def run_train(args: list[str], run_dir: Path, cache_dir: Path, tracking_uri: str | None = None, check: bool = True,
              timeout: int = 600, script: str = "train.py", extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """train.py (or `script`) in a subprocess. One still going after `timeout` seconds gets SIGABRT, with every rank
    it started (one process group), so each prints its Python stacks (faulthandler) into the failure: where it hangs."""
    env = {**subprocess_env(run_dir.parent, cache_dir, tracking_uri), "PYTHONFAULTHANDLER": "1", **(extra_env or {})}
    command = [sys.executable, str(ROOT / script), f"hydra.run.dir={run_dir}", *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            stdout, stderr = process.communicate()
            stacks = "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))
            raise AssertionError(f"train.py {' '.join(args)} still running after {timeout} s:\n{stdout[-3000:]}\n{stacks[-12000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} of a run's CSV log (every version: a resumed run writes a new one)."""
    series = defaultdict(dict)
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            for name, value in row.items():
                if value and name not in ("step", "epoch"):
                    series[name][int(row["step"])] = float(value)
    return series


def run_with_failing_rank(args: list[str], run_dir: Path, cache_dir: Path, rank: int, timeout: int) -> subprocess.CompletedProcess:
    """train.py with rank `rank` raising at global step 3 (tests/failing_rank_train.py); its exit is the test's to judge."""
    return run_train(args, run_dir, cache_dir, check=False, timeout=timeout, script="tests/failing_rank_train.py",
                     extra_env={"FAIL_RANK": str(rank), "FAIL_STEP": "3"})


def mlflow_runs(tracking_uri: str) -> tuple[list, list]:
    """(parent runs, child runs) of the tunelab experiment in an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def save_base_with_untrained_tokens(directory: Path, cache_dir: Path) -> list[int]:
    """The embedded tiny model saved as a from_pretrained directory whose EOS and UNK embedding rows are all zero, as
    untrained special tokens of a released checkpoint are; returns those token ids."""
    import torch

    from tunelab.char_tokenizer import build_char_tokenizer
    from tunelab.model import build_model

    tokenizer = build_char_tokenizer()
    cfg = compose_config([], directory, cache_dir)
    model = build_model(cfg.model, cfg.precision, tokenizer)
    untrained = [tokenizer.eos_token_id, tokenizer.unk_token_id]
    with torch.no_grad():
        model.get_input_embeddings().weight[untrained] = 0
    model.save_pretrained(directory)
    return untrained
