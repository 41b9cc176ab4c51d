"""train.py with one rank raising mid-training: rank FAIL_RANK at global step FAIL_STEP (environment variables), for
tests of how a multi-process run ends when one of its ranks fails. Lightning re-executes this script for the other
ranks, so each of them gets the same callback."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tunelab.callbacks  # noqa: E402


class FailOnRank(pl.Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"rank {self.rank} fails at step {self.step}")


configured = tunelab.callbacks.build_callbacks
failing = FailOnRank(int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"]))
tunelab.callbacks.build_callbacks = lambda cfg: [*configured(cfg), failing]

if __name__ == "__main__":
    # train.py as __main__, its import of build_callbacks getting the one above; sys.argv[0] stays this script, which
    # is what Lightning re-executes for the other ranks (runpy.run_path would set it to train.py).
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
