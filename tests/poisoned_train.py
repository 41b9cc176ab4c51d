"""train.py with one gradient turned NaN at global step POISON_STEP (environment variable) while the loss stays
finite, as a numerical bug does, or with the CUDA allocator's out-of-memory error raised at global step OOM_STEP:
for tests of how a run meets a non-finite gradient or a GPU too small for it (on CPU)."""

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


class OutOfMemoryAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity "
                                         "of 79.19 GiB of which 1.02 GiB is free.")


configured = tunelab.callbacks.build_callbacks
faults = [PoisonGradient(int(os.environ["POISON_STEP"]))] if "POISON_STEP" in os.environ else []
faults += [OutOfMemoryAt(int(os.environ["OOM_STEP"]))] if "OOM_STEP" in os.environ else []
tunelab.callbacks.build_callbacks = lambda cfg: [*configured(cfg), *faults]

if __name__ == "__main__":
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
