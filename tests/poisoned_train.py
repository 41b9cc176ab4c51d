"""train.py with one gradient turned NaN at global step POISON_STEP (environment variable) while the loss stays
finite, as a numerical bug does: for tests of how a run meets a non-finite gradient."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tunelab.callbacks  # noqa: E402


class PoisonGradient(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))


configured = tunelab.callbacks.build_callbacks
poison = PoisonGradient(int(os.environ["POISON_STEP"]))
tunelab.callbacks.build_callbacks = lambda cfg: [*configured(cfg), poison]

if __name__ == "__main__":
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
