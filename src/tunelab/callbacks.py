"""Builds the `callbacks` group, plus the callbacks tunelab ships: grad norms, token throughput, objective."""

import math
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig


class GradNormMonitor(pl.Callback):
    """Logs the gradient norm of each optimizer parameter group (and of all of them) before every optimizer step."""

    def __init__(self, norm_type: float = 2.0):
        self.norm_type = norm_type

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        norms = {}
        for i, group in enumerate(optimizer.param_groups):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                norms[f"grad_norm/{group.get('name', i)}"] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.detach().float(), self.norm_type) for g in grads]), self.norm_type
                )
        if norms:
            norms["grad_norm/total"] = torch.linalg.vector_norm(torch.stack(list(norms.values())), self.norm_type)
            pl_module.log_dict(norms, on_step=True, on_epoch=False)


class TokenThroughputMonitor(pl.Callback):
    """Non-padding tokens per second of training, per step (progress bar and logger) and over the whole run.

    Time runs from one training batch's end to the next, so data loading, logging and checkpointing count too;
    validation does not.
    """

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._last = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def _restart_clock(self, *_) -> None:
        self._last = time.perf_counter()

    on_train_start = on_validation_end = _restart_clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        self.tokens += tokens
        self.seconds += seconds
        pl_module.log("train/tokens_per_s", tokens / seconds, prog_bar=True, on_step=True, on_epoch=False)


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar counts batches of the current epoch; this one also shows the run's optimizer step out of
    max_steps and the time left for the whole run (validation included)."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = (time.perf_counter(), trainer.global_step)

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/-2" when only max_steps bounds the run (max_epochs=-1).
        description = super()._get_train_description(current_epoch)
        return description.replace("/-2", "  ") if self.trainer.max_epochs == -1 else description

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        start_time, start_step = getattr(self, "_started", (None, 0))
        done = trainer.global_step - start_step
        if trainer.max_steps > 0 and done > 0:
            per_step = (time.perf_counter() - start_time) / done
            items["step"] = f"{trainer.global_step}/{trainer.max_steps}"
            items["eta"] = str(timedelta(seconds=round(per_step * (trainer.max_steps - trainer.global_step))))
        return items


class ObjectiveTracker(pl.Callback):
    """Keeps every validation's metrics and the train-loss curve; the run's objective is the best value seen."""

    def __init__(self, metric: str, mode: str):
        self.metric = metric
        self.mode = mode
        self.validations: list[dict[str, float]] = []
        self.train_loss: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_loss.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.validations.append({"step": trainer.global_step, **metrics})

    @property
    def best(self) -> float:
        values = [v[self.metric] for v in self.validations if self.metric in v and math.isfinite(v[self.metric])]
        if not values:
            return float("nan")
        return min(values) if self.mode == "min" else max(values)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    allowed = ["lightning.pytorch.callbacks.*", "tunelab.callbacks.*"]
    return [instantiate(spec, _execution_whitelist_=allowed) for spec in (cfg or {}).values() if spec is not None]
