"""train.py that sends itself the signal SIGNAL (a name, environment variable) as the optimizer step after global step
SIGNAL_STEP starts: for tests of a preemption signal that arrives during a given step (one with a validation after it,
say), which an outside kill cannot time."""

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tunelab.callbacks  # noqa: E402


class SignalDuringStep(pl.Callback):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


configured = tunelab.callbacks.build_callbacks
sender = SignalDuringStep(signal.Signals[os.environ["SIGNAL"]], int(os.environ["SIGNAL_STEP"]))
tunelab.callbacks.build_callbacks = lambda cfg: [*configured(cfg), sender]

if __name__ == "__main__":
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
