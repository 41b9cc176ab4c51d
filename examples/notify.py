"""A callback of your own: POST a JSON message when validation first crosses a threshold and when training ends.

    PYTHONPATH=examples python train.py +callbacks.notify._target_=notify.NotifyOnFinish \
        +callbacks.notify.url=https://hooks.example.com/tunelab +callbacks.notify.threshold=0.5

Any endpoint that takes a JSON POST will do (a chat webhook, ntfy, your own server); a URL holding a token is better
given as NOTIFY_URL in the environment, out of the config the run records. Only the standard library is used; a
notification that fails is logged and never stops the run.
"""

import json
import logging
import math
import os
import urllib.request
from urllib.parse import urlsplit

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class NotifyOnFinish(pl.Callback):
    """Sends {"event": "threshold", ...} the first time `metric` is better than `threshold` at a validation (with
    `threshold` set), and {"event": "finished", ...} with the best value seen when training ends. Rank 0 only."""

    def __init__(self, url: str | None = None, threshold: float | None = None, metric: str = "val/loss",
                 mode: str = "min", timeout: float = 10.0):
        url = url or os.environ.get("NOTIFY_URL")
        if not url or mode not in ("min", "max"):
            raise ValueError("NotifyOnFinish needs url=... (or the NOTIFY_URL environment variable) and mode min or max")
        self.url, self.threshold, self.metric, self.mode, self.timeout = url, threshold, metric, mode, timeout
        self.best: float | None = None
        self.crossed = False

    def better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None or not math.isfinite(value := float(value)):
            return
        if self.best is None or self.better(value, self.best):
            self.best = value
        if self.threshold is not None and not self.crossed and self.better(value, self.threshold):
            self.crossed = True
            self.post(trainer, {"event": "threshold", "threshold": self.threshold, "value": value})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.post(trainer, {"event": "finished", "best": self.best, "mode": self.mode})

    def post(self, trainer: pl.Trainer, message: dict) -> None:
        if not trainer.is_global_zero:
            return
        message = {**message, "metric": self.metric, "step": trainer.global_step,
                   "run_id": getattr(trainer.logger, "run_id", None)}
        request = urllib.request.Request(self.url, data=json.dumps(message).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout):
                pass
        except OSError as error:  # URLError, a refused connection, a timeout: the run matters more than its message
            # The host only: a webhook's URL often holds its token.
            log.warning("notify: POST to %s failed: %s", urlsplit(self.url).hostname, error)
