"""Progress for a log that is not a terminal (CI, nohup, a SLURM job's output): plain lines, one every few logging
steps and one per validation. A rich progress bar redraws itself with cursor moves that such a log keeps as
fragments (`train/tokens_per_…` and `8852.792 val/loss:` on separate lines); the tqdm bars of the libraries tunelab
calls (datasets' map, lm-evaluation-harness's requests, the Hub's downloads) redraw after carriage returns, which such
a log keeps as one long line of fragments: there each bar becomes the one line it ends on (PlainLines)."""

import io
import re
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

LINES_PER_RUN = 20  # about how many training lines a run prints, whatever its length


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class PlainProgressLog(ProgressBar):
    """Prints `step 120/600  train/loss 0.8123  train/tokens_per_s 8853  eta 0:00:48` on logging steps, at most about
    LINES_PER_RUN times a run, and each validation's metrics. Metrics are read on logging steps only, as the rich bar
    reads them: reading one copies it to the host, a GPU sync."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._started = (0.0, 0)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def every_n_steps(self, trainer: pl.Trainer) -> int:
        """A multiple of the logging interval, so each printed step has fresh metrics."""
        log_every = max(1, trainer.log_every_n_steps)
        if trainer.max_steps <= 0:
            return log_every
        windows = max(1, trainer.max_steps // (log_every * LINES_PER_RUN))
        return windows * log_every

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer._logger_connector.should_update_logs or step % self.every_n_steps(trainer):
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        parts += [f"{name} {fmt(value)}" for name, value in sorted(metrics.items())]
        start_time, start_step = self._started
        if trainer.max_steps > 0 and step > start_step:
            per_step = (time.perf_counter() - start_time) / (step - start_step)
            parts.append(f"eta {timedelta(seconds=round(per_step * (trainer.max_steps - step)))}")
        self.print("  ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self.print(f"validation at step {trainer.global_step}: "
                       + "  ".join(f"{name} {fmt(value)}" for name, value in sorted(metrics.items())))

    def print(self, *args, **kwargs) -> None:
        if self.trainer.is_global_zero:
            print(*args, **kwargs, flush=True)


def progress_for_this_output(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """A rich progress bar stays where stdout is a terminal; elsewhere it becomes plain periodic lines."""
    if sys.stdout.isatty():
        return callbacks
    return [PlainProgressLog() if isinstance(c, RichProgressBar) else c for c in callbacks]


class PlainLines(io.TextIOBase):
    """A text stream over `stream` that writes only whole lines: what follows a carriage return replaces what came
    before it on the line, so of a tqdm bar's redraws only the state it ends in, `Running loglikelihood requests:
    100%|██████████| 12/12 [00:00<00:00, 203.53it/s]`, is written; text without carriage returns passes as it is."""

    def __init__(self, stream):
        self.stream, self.line = stream, ""

    def write(self, text: str) -> int:
        for part in re.split(r"(\r|\n)", text):
            if part == "\n":
                self.stream.write(self.line + "\n")
                self.stream.flush()
                self.line = ""
            elif part == "\r":
                self.line = ""
            else:
                self.line += part
        return len(text)

    def isatty(self) -> bool:
        return False

    # What code that writes past the text layer asks of sys.stderr: the stream's own.
    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def buffer(self):
        return self.stream.buffer

    def fileno(self) -> int:
        return self.stream.fileno()


def plain_lines_outside_a_terminal() -> None:
    """Where stderr, which tqdm draws on, is not a terminal: each library progress bar there is the line it ends on."""
    if not sys.stderr.isatty() and not isinstance(sys.stderr, PlainLines):
        sys.stderr = PlainLines(sys.stderr)
