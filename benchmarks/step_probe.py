"""A callback for benchmarks/stream_data.py: after each training step, the step, the wall time and the process's
resident memory, one line each."""

import time
from pathlib import Path

import lightning.pytorch as pl

PAGE = 4096


class StepProbe(pl.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
        with self.path.open("a") as file:
            file.write(f"{trainer.global_step} {time.time()} {resident}\n")
