"""Prints one run's figures from its run dir: median tokens/s per step (after warm-up), peak GPU memory, checkpoint.

Usage: python benchmarks/run_figures.py <run dir> [warm-up steps]
"""

import csv
import json
import statistics
import sys
from pathlib import Path


def main(run_dir: Path, warmup: int) -> None:
    result = json.loads((run_dir / "objective.json").read_text())
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    per_step = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s") and int(r["step"]) >= warmup]
    last = run_dir / "checkpoints" / "last.ckpt"
    size = sum(f.stat().st_size for f in last.rglob("*")) if last.is_dir() else last.stat().st_size if last.exists() else 0
    print(json.dumps({
        "run": run_dir.name,
        "median_tokens_per_s": round(statistics.median(per_step)) if per_step else None,
        "steps_timed": len(per_step),
        "whole_run_tokens_per_s": round(result["tokens_per_second"] or 0),
        "peak_gpu_memory_gib": round(result["peak_gpu_memory_gib"] or 0, 2),
        "global_step": result["global_step"],
        "val_loss": round(result["objective"], 4),
        "last_checkpoint": f"{'sharded dir' if last.is_dir() else 'file'} {size / 2**30:.2f} GiB",
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5)
