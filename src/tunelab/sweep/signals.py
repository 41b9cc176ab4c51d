"""What a trial can report at a validation instead of its loss, so that early validations rank trials as their ends do
(issue 21). Under a decaying schedule the loss at step t measures a run whose LR is still high: high-LR trials look
worst until their schedule decays, then end best (Kendall tau 0.30 between the loss at step 25 of 150 and the final
loss, BENCHMARKS.md). Two signals take the LR out of the comparison:

- CooldownFork: at a validation the trial forks, anneals its LR to the schedule's minimum over a few steps on the
  batches it would train on next, validates the cooled weights, and returns to the fork point exactly: a short cooldown
  from any point predicts what a run of that length with a full decay reaches (Hägele et al. 2024, arXiv 2405.18392).
  The fork's steps cost trial-steps.
- WeightAverage: an exponential moving average of the trainable weights, validated beside the weights at no steps.

Each logs its value beside val/loss (val/loss_cooled, val/loss_ema) and leaves it in trainer.callback_metrics, where a
sweep's trial reports it to the pruner instead of the objective (hydra.sweeper.signal). Both run by hand, outside
Lightning's loop, on the module's own optimizer: no step counter, data position, RNG state, optimizer or scheduler
state of the run changes, so a run ends bitwise as it would without them (tests/test_pruning_signals.py). They work
on tunelab's CausalLMModule (its `model` and `loss`), LoRA or full, on one device or under DDP; not under FSDP or
DeepSpeed, whose sharded weights and optimizer state a copy here would not see whole.
"""

import copy
import itertools
import math

import lightning.pytorch as pl
import torch

from tunelab.modules.base import restore_rng_states, rng_states

SHAPES = ("linear", "1-sqrt")
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "FSDP2Strategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def takes_signal(trainer: pl.Trainer) -> bool:
    """At a validation past step 0 with steps still to come: the last validation's loss already is the cooled one."""
    return not trainer.sanity_checking and 0 < trainer.global_step < trainer.max_steps and not trainer.should_stop


def check_strategy(trainer: pl.Trainer, name: str) -> None:
    if type(trainer.strategy).__name__ in UNSUPPORTED_STRATEGIES:
        raise ValueError(f"{name} needs whole weights on each rank (one device or DDP), not "
                         f"{type(trainer.strategy).__name__}: switch it off with callbacks.<its name>=null")


def trainable(pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
    return [p for p in pl_module.parameters() if p.requires_grad]


def validation_loss(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """val/loss as CausalLMModule.validation_step computes and Lightning reduces it: each batch's loss weighted by its
    rows, over the batches the validation loop runs, then the mean over ranks. RNG states are kept: a DataLoader's
    iterator draws its seed from torch's, which would change the run's next dropout masks."""
    rng = rng_states()
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    was_training = pl_module.training
    pl_module.eval()
    total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
    rows = 0
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for loader, count in zip(loaders, trainer.num_val_batches):
            for batch in itertools.islice(loader, None if math.isinf(count) else int(count)):
                batch = trainer.strategy.batch_to_device(batch)
                if hasattr(pl_module.loss, "evaluate"):
                    loss, _ = pl_module.loss.evaluate(pl_module.model, batch)
                else:
                    loss = pl_module.loss(pl_module.model, batch)
                size = batch["input_ids"].size(0)
                total += loss.double() * size
                rows += size
    pl_module.train(was_training)
    restore_rng_states(rng)
    return float(trainer.strategy.reduce(total / max(rows, 1), reduce_op="mean"))


def log_signal(trainer: pl.Trainer, metric: str, value: float) -> None:
    """Into callback_metrics (where the trial reads it) and the loggers, at the step Lightning logged this validation's
    val/loss at (its count of batches that stepped, one behind global_step until the validation ends), so that the
    two curves share their steps."""
    trainer.callback_metrics[metric] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({metric: value}, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


class TrainingState:
    """A copy of everything a training step changes (trainable weights and gradients, optimizer state and LRs, RNG
    states, train/eval mode), put back in place so the tensors the optimizer and the model hold stay the same objects."""

    def __init__(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer):
        self.pl_module, self.optimizer = pl_module, optimizer
        self.params = trainable(pl_module)
        self.weights = [p.detach().clone() for p in self.params]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.state = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in optimizer.state[p].items()}
                      for p in self.params if p in optimizer.state}
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        self.rng = rng_states()
        self.training = pl_module.training

    def restore(self) -> None:
        with torch.no_grad():
            for param, weight, grad in zip(self.params, self.weights, self.grads):
                param.copy_(weight)
                param.grad = None if grad is None else grad
        for param in self.params:
            saved = self.state.get(param)
            if saved is None:
                self.optimizer.state.pop(param, None)
                continue
            live = self.optimizer.state[param]
            for key, value in saved.items():
                if torch.is_tensor(value) and torch.is_tensor(live.get(key)):
                    live[key].copy_(value)
                else:
                    live[key] = value
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        restore_rng_states(self.rng)
        self.pl_module.train(self.training)


class CooldownFork(pl.Callback):
    """At each validation but the last: `steps` optimizer steps with the LR annealed from where the schedule is to its
    minimum (min_lr_ratio x the peak; null: the run's optim.min_lr_ratio), shaped `linear` or `1-sqrt` (Hägele et
    al.'s), on the batches that come next in the run's data order; then the cooled weights' val/loss is logged as
    `metric` and the run continues from the fork point as if it had not happened."""

    def __init__(self, steps: int = 5, shape: str = "linear", min_lr_ratio: float | None = None,
                 metric: str = "val/loss_cooled"):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps} must be an integer >= 1")
        if shape not in SHAPES:
            raise ValueError(f"shape={shape} is not one of: {', '.join(SHAPES)}")
        self.steps, self.shape, self.min_lr_ratio, self.metric = steps, shape, min_lr_ratio, metric
        self.forks = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer, "CooldownFork")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics.pop(self.metric, None)  # a value is of this validation only
        if takes_signal(trainer):
            log_signal(trainer, self.metric, self.fork(trainer, pl_module))

    def fork(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        optimizer = trainer.optimizers[0]
        saved = TrainingState(pl_module, optimizer)
        try:
            self.cool_down(trainer, pl_module, optimizer, saved.params)
            value = validation_loss(trainer, pl_module)
        finally:
            saved.restore()
        self.forks += 1
        return value

    def lr_floor(self, pl_module: pl.LightningModule, group: dict) -> float:
        ratio = self.min_lr_ratio if self.min_lr_ratio is not None else pl_module.optim_cfg.min_lr_ratio
        return ratio * group.get("initial_lr", group["lr"])

    def cool_down(self, trainer, pl_module, optimizer, params) -> None:
        # A loader of its own: the datamodule positions a new sampler where the run is (tunelab.data.resume_position),
        # and the run's iterator is never touched. Past the epoch's end the fork reads the epoch again from its start.
        loader = trainer.datamodule.train_dataloader()
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        start = [group["lr"] for group in optimizer.param_groups]
        floors = [self.lr_floor(pl_module, group) for group in optimizer.param_groups]
        accumulate = trainer.accumulate_grad_batches
        pl_module.train()
        with torch.inference_mode(False), torch.enable_grad():  # the validation loop runs its hooks in inference mode
            for step in range(self.steps):
                elapsed = (step + 1) / self.steps
                scale = 1 - elapsed if self.shape == "linear" else 1 - math.sqrt(elapsed)
                for group, lr, floor in zip(optimizer.param_groups, start, floors):
                    group["lr"] = floor + (lr - floor) * scale
                optimizer.zero_grad(set_to_none=True)
                for batch in itertools.islice(batches, accumulate):
                    with trainer.precision_plugin.forward_context():
                        loss = pl_module.loss(pl_module.model, trainer.strategy.batch_to_device(batch))
                    (loss / accumulate).backward()
                if trainer.world_size > 1:  # the module is called past DDP's wrapper: average the gradients by hand
                    for param in params:
                        if param.grad is not None:
                            param.grad.copy_(trainer.strategy.reduce(param.grad, reduce_op="mean"))
                if trainer.gradient_clip_val:
                    torch.nn.utils.clip_grad_norm_(params, trainer.gradient_clip_val)
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class WeightAverage(pl.Callback):
    """An exponential moving average of the trainable weights, updated after each optimizer step (ema = decay x ema +
    (1 - decay) x weights, on the device, no host sync) and validated at each validation but the last by swapping it
    in and back; the val/loss of the averaged weights is logged as `metric`. Kept in checkpoints, so a resumed run
    averages on."""

    def __init__(self, decay: float = 0.9, metric: str = "val/loss_ema"):
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay} must be within (0, 1)")
        self.decay, self.metric = decay, metric
        self.average: list[torch.Tensor] | None = None
        self.last_step = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer, "WeightAverage")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last_step:
            return  # within gradient accumulation: no new weights yet
        self.last_step = trainer.global_step
        params = trainable(pl_module)
        with torch.no_grad():
            if self.average is None:
                self.average = [p.detach().clone() for p in params]
                return
            for average, param in zip(self.average, params):
                average.lerp_(param.detach().to(average.dtype), 1 - self.decay)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics.pop(self.metric, None)
        if takes_signal(trainer) and self.average is not None:
            params = trainable(pl_module)
            with torch.no_grad():
                current = [p.detach().clone() for p in params]
                for param, average in zip(params, self.average):
                    param.copy_(average)
            try:
                value = validation_loss(trainer, pl_module)
            finally:
                with torch.no_grad():
                    for param, weights in zip(params, current):
                        param.copy_(weights)
            log_signal(trainer, self.metric, value)

    def state_dict(self) -> dict:
        return {"average": self.average, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.average, self.last_step = state_dict["average"], state_dict["last_step"]


PRODUCERS = {"val/loss_cooled": CooldownFork, "val/loss_ema": WeightAverage}  # hydra.sweeper.signal: its callback
