"""A callback for tests/test_streaming_runs.py: the process's resident memory after each training step, one line each."""

from pathlib import Path

import lightning.pytorch as pl

PAGE = 4096


class RssProbe(pl.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        with self.path.open("a") as file:
            file.write(f"{trainer.global_step} {resident_pages * PAGE}\n")
