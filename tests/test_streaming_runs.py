"""data.streaming=true through train.py: a mid-stream resume trains on the batches of the unbroken run (one process,
and 2 gloo ranks of 2 dataloader workers each, mixed and packed), memory stays flat over a file far larger than its
growth, nothing is cached, and bad rows end the run in one line only where the stream starts with them."""

import csv
import json
import random
from pathlib import Path

import pytest

from tests.conftest import run_train

STEPS = ["trainer.max_steps=16", "trainer.val_check_interval=8", "callbacks.progress_bar=null", "callbacks.samples=null",
         "callbacks.early_stopping=null", "validate_at_start=false", "logger=csv", "trainer.log_every_n_steps=1",
         "callbacks.model_checkpoint.save_top_k=-1", "export=false", "optim.lr=3e-3"]
STREAM = ["data.streaming=true", "data.shuffle_block=64", "data.max_val_examples=16"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_task(path: Path, operation: str, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(rows):
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
            answer = word[::-1] if operation == "reverse" else word.upper()
            file.write(json.dumps({"instruction": operation, "input": word, "output": answer}) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def straight_and_resumed(args: list[str], root: Path, cache: Path) -> tuple[dict, dict]:
    run_train(args, root / "straight", cache)
    step8 = root / "straight" / "checkpoints" / "step000008.ckpt"
    run_train([*args, f"ckpt_path={step8}"], root / "resumed", cache)
    return train_losses(root / "straight"), train_losses(root / "resumed")


def test_a_resume_mid_stream_trains_on_the_batches_of_the_unbroken_run(tmp_path, dataset_cache):
    path = write_task(tmp_path / "rows.jsonl", "reverse", 600, 1)
    args = [*STEPS, *STREAM, "data=jsonl", f"data.path={path}", "data.batch_size=8"]
    straight, resumed = straight_and_resumed(args, tmp_path, dataset_cache)
    assert sorted(resumed) == list(range(8, 16))  # steps 9..16 (logged at 0-based 8..15)
    for step in range(8, 16):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_two_ranks_of_two_workers_resume_a_packed_mix_exactly(tmp_path, dataset_cache):
    rev = write_task(tmp_path / "reverse.jsonl", "reverse", 500, 1)
    up = write_task(tmp_path / "upper.jsonl", "upper", 150, 2)
    args = [*STEPS, *STREAM, "data=tiny", f"+data.sources=[{{name:rev,path:'{rev}',weight:3}},{{name:up,path:'{up}',weight:1}}]",
            "data.packing=true", "data.pack_tokens=256", "data.num_workers=2",
            "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    straight, resumed = straight_and_resumed(args, tmp_path, dataset_cache)
    assert sorted(resumed) == list(range(8, 16))
    for step in range(8, 16):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "validation: the first 16 rows of each" in log


def test_memory_stays_flat_over_a_file_far_larger_and_nothing_is_cached(tmp_path, dataset_cache):
    """~150 MB of rows, most of them 50 kB rows of no format (counted as bad, skipped) between good ones: the run reads
    past the whole file (into a second pass) with its resident memory growing by less than a third of the file, and
    writes nothing but its checkpoints, logs and MLflow store."""
    path = tmp_path / "data" / "big.jsonl"
    path.parent.mkdir()
    padding = json.dumps({"text": "z" * 50_000}) + "\n"
    with path.open("w") as file:
        write_rows = write_task(tmp_path / "good.jsonl", "reverse", 1_100, 3).read_text().splitlines(keepends=True)
        file.writelines(write_rows[:1_000])  # the rows the checks read
        for row in write_rows[1_000:]:
            file.write(row)
            file.write(padding * 30)
    size = path.stat().st_size
    assert size > 140e6
    cache_before = sorted(p for p in dataset_cache.rglob("*"))
    probe = tmp_path / "rss.txt"
    args = [*STEPS, "trainer.max_steps=40", "trainer.val_check_interval=40", "data=jsonl", f"data.path={path}",
            "data.format=alpaca", "data.streaming=true", "data.shuffle_block=32", "data.max_val_examples=8",
            "data.batch_size=32", "+callbacks.rss._target_=tests.stream_memory_probe.RssProbe", f"+callbacks.rss.path={probe}",
            "callbacks.model_checkpoint.save_top_k=1"]
    run_train(args, tmp_path / "run", dataset_cache)
    rss = [int(line.split()[1]) for line in probe.read_text().splitlines()]
    assert max(rss[5:]) - rss[5] < size / 3, [round(r / 1e6) for r in rss]
    assert sorted(p for p in dataset_cache.rglob("*")) == cache_before  # no datasets cache written
    metrics = {r["step"]: r for r in csv.DictReader(open(next((tmp_path / "run").glob("csv/version_*/metrics.csv"))))}
    bad = max(float(r["data/rows_bad"]) for r in metrics.values() if r.get("data/rows_bad"))
    assert bad == 100 * 30  # the whole file read (into a second pass): every padding row counted once, none fatal
    written = {p.relative_to(tmp_path / "run").parts[0] for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert written <= {"checkpoints", "csv", "train.log", "objective.json", "loss_curves.png", ".hydra", "mlflow.db"}, written
