"""Resuming: N steps, then resume to 2N, equals 2N straight: model, optimizer, scheduler, step, data order, RNG."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import FAST, ROOT, compose_config, run_train, subprocess_env

N = 10


def latest_run_history(uri: str, metric: str) -> list:
    """`metric`'s history in the latest MLflow run of the store, by step."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id], order_by=["start_time DESC"])
    return sorted(client.get_metric_history(runs[0].info.run_id, metric), key=lambda m: m.step)


@pytest.mark.parametrize("peft,packing", [("none", False), ("lora", False), ("none", True)], ids=["full", "lora", "packed"])
def test_resume_matches_straight_run(tmp_path, dataset_cache, peft, packing):
    common = [*FAST, f"peft={peft}", f"trainer.val_check_interval={N}", f"optim.total_steps={2 * N}", "export=false"]
    if packing:  # ~12 examples a packed batch, so the resume at step N falls mid-epoch
        common += ["data.packing=true", "data.pack_tokens=256"]
    # LoRA keeps its dropout: the masks after a mid-epoch resume must be the unbroken run's too.
    straight_uri, resumed_uri = f"sqlite:///{tmp_path / 'straight.db'}", f"sqlite:///{tmp_path / 'resumed.db'}"

    run_train([*common, f"trainer.max_steps={2 * N}"], tmp_path / "straight", dataset_cache, straight_uri)
    run_train([*common, f"trainer.max_steps={N}"], tmp_path / "resumed", dataset_cache, resumed_uri)
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == N and "rng_states" in checkpoint
    second = run_train([*common, f"trainer.max_steps={2 * N}", "ckpt_path=last"], tmp_path / "resumed", dataset_cache,
                       resumed_uri)

    # A second call that ignored ckpt_path would train 2N steps from scratch with the same seed and match too: the
    # resumed call must have loaded last.ckpt and trained (and logged) only the steps after N.
    resumed_train_steps = [m.step for m in latest_run_history(resumed_uri, "train/loss")]
    assert resumed_train_steps and min(resumed_train_steps) >= N, resumed_train_steps
    assert f"Restoring states from the checkpoint path at {tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt'}" in (
        second.stdout + second.stderr)
    straight, resumed = latest_run_history(straight_uri, "val/loss")[-1], latest_run_history(resumed_uri, "val/loss")[-1]
    assert straight.step == resumed.step == 2 * N - 1
    assert resumed.value == pytest.approx(straight.value, rel=1e-5, abs=1e-6)


def start_train(args: list[str], run_dir: Path, cache_dir: Path, tracking_uri: str, script: str = "train.py",
                extra_env: dict | None = None) -> subprocess.Popen:
    """train.py (or `script`) started in the background in a process group of its own, for a test to interrupt."""
    env = {**subprocess_env(run_dir.parent, cache_dir, tracking_uri), **(extra_env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / script), f"hydra.run.dir={run_dir}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"train.py exited {process.returncode} first:\n{process.stdout.read()[-5000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"still waiting after {timeout} s:\n{process.communicate()[0][-5000:]}")
        time.sleep(0.1)


def other_filesystem_tmpdir(than: Path) -> dict:
    """$TMPDIR on a filesystem other than the run dir's, as on a cluster (node-local /tmp, shared outputs), where
    anything staged in $TMPDIR reaches the run dir by a copy rather than a rename; empty where /dev/shm is not one."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == than.stat().st_dev:
        return {}
    return {"TMPDIR": tempfile.mkdtemp(dir=shm)}


def test_a_run_killed_while_writing_last_ckpt_resumes_from_the_previous_one(tmp_path, dataset_cache):
    common = [*FAST, "trainer.max_steps=30", "optim.total_steps=30", "export=false"]
    run_dir, marker, uri = tmp_path / "run", tmp_path / "stalled", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The second write of last.ckpt (step 20) stops after its first megabyte; SIGKILL lands there.
    process = start_train(common, run_dir, dataset_cache, uri, script="tests/stalling_disk_train.py",
                          extra_env={"STALL_AT_WRITE": "2", "STALL_MARKER": str(marker), **other_filesystem_tmpdir(tmp_path)})
    wait_until(marker.exists, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()

    checkpoints = run_dir / "checkpoints"
    partial = [p for p in checkpoints.iterdir() if p.name.startswith("last.ckpt.")]
    assert partial and all(p.stat().st_size == 1 << 20 for p in partial)  # the half-written file, under another name
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 10

    resumed = run_train([*common, "ckpt_path=last"], run_dir, dataset_cache, uri)
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "objective.json").read_text())["global_step"] == 30
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]  # the next write of last.ckpt removed the leftover


# A real FSDPStrategy (sharded state dict) on CPU, in one process, saving last.ckpt at step 10, then at step 20 killed
# right after the swap moved the old directory aside, before the new one took its name.
KILLED_MID_SWAP = """
import os, signal, sys, torch
from pathlib import Path
from lightning.pytorch.strategies import FSDPStrategy
from tunelab.checkpoint import stage_directory_checkpoints

last, replace = Path(sys.argv[1]), os.replace
strategy = FSDPStrategy(state_dict_type="sharded")
stage_directory_checkpoints(strategy)

def save(step):
    strategy.save_checkpoint({"state_dict": {"w": torch.full((4,), float(step))}, "optimizer_states": [], "global_step": step}, last)

def replace_then_die(source, target):
    replace(source, target)
    if Path(source) == last:
        os.kill(os.getpid(), signal.SIGKILL)

save(10)
os.replace = replace_then_die
save(20)
"""


def sharded_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "optimizer_states": [], "global_step": step}


def test_a_sharded_checkpoint_directory_killed_mid_swap_resumes_the_previous_one(tmp_path, dataset_cache):
    from torch.distributed.checkpoint import load
    from lightning.pytorch.strategies import FSDPStrategy

    from tunelab.checkpoint import resolve_ckpt_path, stage_directory_checkpoints

    checkpoints = tmp_path / "run" / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(checkpoints / "last.ckpt")], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    assert not (checkpoints / "last.ckpt").exists()

    resumed = Path(resolve_ckpt_path(compose_config(["ckpt_path=last"], tmp_path / "run", dataset_cache)))
    assert resumed.name.startswith("last.ckpt.old-")
    assert torch.load(resumed / "meta.pt")["global_step"] == 10
    weights = {"model": {"w": torch.zeros(4)}}
    load(weights, checkpoint_id=resumed)
    assert weights["model"]["w"].tolist() == [10.0] * 4

    strategy = FSDPStrategy(state_dict_type="sharded")  # the resumed run's next save
    stage_directory_checkpoints(strategy)
    strategy.save_checkpoint(sharded_checkpoint(30), checkpoints / "last.ckpt")
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt")["global_step"] == 30
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # the killed swap's leftovers are gone


def test_last_ckpt_is_the_latest_validation_even_when_the_objective_got_worse(tmp_path, dataset_cache):
    # objective.mode=max on a falling val/loss: only the first validation is "best". Lightning 2.6 wrote last.ckpt only
    # beside a new best, so ckpt_path=last went back to step 10 (tunelab.checkpoint.BestAndLastCheckpoint).
    run_dir = tmp_path / "run"
    run_train([*FAST, "objective.mode=max", "callbacks.early_stopping=null", "callbacks.samples=null", "export=false",
               "logger=none"], run_dir, dataset_cache)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step000010.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 20
