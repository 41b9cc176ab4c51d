"""Builds the `callbacks` group, plus the callbacks tunelab ships: grad norms, token throughput, objective."""

import math
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from tunelab.targets import build_target


def gradient_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of `grads` taken together, in float32, the same on every rank: FSDP2's gradients are shards
    (DTensors), whose norms are summed over the ranks (a collective: every rank must call it)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, norm_type, dtype=torch.float32)), norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class GradNormMonitor(pl.Callback):
    """Logs the gradient norm of each optimizer parameter group (and of all of them) on logging steps only
    (trainer.log_every_n_steps): the norms stay on the device until the logger reads them."""

    def __init__(self, norm_type: float = 2.0):
        self.norm_type = norm_type

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        norms = {}
        for i, group in enumerate(optimizer.param_groups):
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                norms[f"grad_norm/{group.get('name', i)}"] = gradient_norm(grads, self.norm_type)
        if norms:
            norms["grad_norm/total"] = torch.linalg.vector_norm(torch.stack(list(norms.values())), self.norm_type)
            pl_module.log_dict(norms, on_step=True, on_epoch=False)


def within_fit(trainer: pl.Trainer) -> bool:
    """A validation that runs between training steps (trainer.training is False there), not the sanity check."""
    return trainer.state.fn == "fit" and not trainer.sanity_checking


class TrainingDiverged(RuntimeError):
    """The training loss or gradient norm turned NaN or infinite."""


class DivergenceGuard(pl.Callback):
    """Ends a run whose training loss or gradient norm turns non-finite (`action: stop`), or skips the optimizer step
    of each such batch (`action: skip`).

    `stop` keeps each step's loss and grad norm on the device and reads them on the host only at logging steps and
    before each validation: the run stops within trainer.log_every_n_steps steps of the first bad one, names that step
    and its values, and never reaches the checkpoint written at validation with bad weights, so the last good one
    stays.
    `skip` must decide before each optimizer step, which costs one host sync a step.
    """

    def __init__(self, action: str = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.divergence.action={action} is not one of: stop, skip")
        self.action = action
        self.skipped = 0
        self._unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm) since the last check

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = gradient_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        self._grad_norm = norm
        if self.action == "skip" and not torch.isfinite(norm):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # an optimizer leaves a parameter without a gradient as it is
            self.skipped += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logging_step = trainer._logger_connector.should_update_logs
        if self.action == "skip":
            if logging_step:
                pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            return
        if not isinstance(outputs, dict) or "loss" not in outputs:
            return
        loss = outputs["loss"].detach()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step loggers put this batch's metrics at
        self._unchecked.append((step, loss, getattr(self, "_grad_norm", loss.new_zeros(()))))
        if logging_step:
            self.check()

    def on_validation_start(self, trainer, pl_module) -> None:
        if within_fit(trainer):
            self.check()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check()  # a checkpoint saved between logging steps (a preempted run's) never holds unchecked steps

    def check(self) -> None:
        """Raises TrainingDiverged naming the first non-finite step since the last check (one host read)."""
        if not self._unchecked:
            return
        steps, losses, norms = zip(*self._unchecked)
        self._unchecked = []
        values = torch.stack([torch.stack(losses).float(), torch.stack(norms).float()]).cpu()
        bad = (~torch.isfinite(values)).any(0).nonzero()
        if len(bad):
            first = int(bad[0])
            raise TrainingDiverged(
                f"training diverged at step {steps[first]}: train/loss={values[0, first]:g}, grad norm={values[1, first]:g}; "
                "the last good checkpoint is kept. Lower optim.lr, raise optim.warmup_steps or keep "
                "trainer.gradient_clip_val, or set callbacks.divergence.action=skip to skip such steps")


class TokenThroughputMonitor(pl.Callback):
    """Non-padding tokens per second of training, over each window of logging steps (trainer.log_every_n_steps) and
    over the whole run.

    Tokens are summed on the device and read once per window, where the clock is read too: no GPU-to-host sync on the
    steps between. A window ends at each logging step and before each validation, so data loading, logging and
    checkpointing count; validation does not.
    """

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._window_tokens = None
        self._window_start = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def _start_window(self, *_) -> None:
        self._window_tokens, self._window_start = 0, time.perf_counter()

    on_train_start = on_validation_end = _start_window

    def _close_window(self, trainer) -> float | None:
        """tokens/s of the window now ending (all ranks), or None for an empty one."""
        if self._window_start is None or not torch.is_tensor(self._window_tokens):
            return None
        tokens = int(self._window_tokens) * trainer.world_size  # the one sync of the window
        seconds = time.perf_counter() - self._window_start
        self.tokens += tokens
        self.seconds += seconds
        self._start_window()
        return tokens / seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._window_tokens = self._window_tokens + batch["attention_mask"].sum()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer._logger_connector.should_update_logs:
            rate = self._close_window(trainer)
            if rate is not None:
                pl_module.log("train/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        if within_fit(trainer):
            self._close_window(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_window(trainer)


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

    def _update_metrics(self, trainer, pl_module) -> None:
        # Reading logged metrics copies each to the host, a GPU sync: while training, only on logging steps.
        if trainer.training and not trainer.sanity_checking and not trainer._logger_connector.should_update_logs:
            return
        super()._update_metrics(trainer, pl_module)

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


class ValidateAtStart(pl.Callback):
    """Validates the model as fine-tuning finds it, before the first optimizer step: every val curve starts at step 0
    from the base model, so a run that makes the model worse shows it.

    Only a run starting at step 0: a resumed run has its step-0 point already. Nothing is written for step 0 (Lightning's
    ModelCheckpoint saves nothing before a step is taken), and the objective leaves the point out (ObjectiveTracker).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 or trainer.val_dataloaders is None:
            return
        # What Lightning's training epoch loop does around a validation between steps.
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        connector._first_loop_iter = first_loop_iter


def validation_at_start(setting: str | bool) -> list[pl.Callback]:
    """`validate_at_start`: auto validates single runs at step 0, not a sweep's trials, whose step-0 points are all the
    same base on the same rows: a validation more per trial that tells the sampler and the pruner nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    on = setting is True or (setting == "auto" and HydraConfig.get().mode != RunMode.MULTIRUN)
    return [ValidateAtStart()] if on else []


class ObjectiveTracker(pl.Callback):
    """Keeps every validation's metrics and the train-loss curve; the run's objective is the best value seen after
    training began. The step-0 validation of the base (ValidateAtStart) is a reference point, not a result of the run:
    there is no checkpoint of it, and a run that only made the model worse returns how far it got, so a sweep ranks it
    below the runs that improved rather than level with them at the base's value."""

    def __init__(self, metric: str, mode: str):
        self.metric = metric
        self.mode = mode
        self.validations: list[dict[str, float]] = []
        self.train_loss: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer._logger_connector.should_update_logs:  # reading a logged metric syncs with the GPU
            return
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_loss.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # An eval/ objective is kept too (tunelab.evaluation logs it at each validation when it is the objective).
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") or k == self.metric}
        self.validations.append({"step": trainer.global_step, **metrics})

    def state_dict(self) -> dict:
        return {"validations": self.validations, "train_loss": self.train_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run's objective and loss curves cover the steps before the checkpoint too."""
        self.validations = list(state_dict["validations"])
        self.train_loss = [tuple(point) for point in state_dict["train_loss"]]

    @property
    def best(self) -> float:
        values = [v[self.metric] for v in self.validations
                  if v["step"] > 0 and self.metric in v and math.isfinite(v[self.metric])]
        if not values:
            return float("nan")
        return min(values) if self.mode == "min" else max(values)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Each entry's `_target_`: Lightning's, tunelab's or the user's own Callback subclass (tunelab.targets)."""
    return [build_target(f"callbacks.{name}", spec) for name, spec in (cfg or {}).items() if spec is not None]
