"""What tunelab's LightningModules share (FineTuningModule): the model they train, the optim group's optimizer and
schedule, sharding under strategy=fsdp, checkpoints (adapter-only for LoRA) that carry every RNG's state, and how a
step's values are logged; and the `module` group's builder. Each module option adds its own training and validation
steps beside this file (causal_lm.py, dpo.py); `module._target_` may name the user's own LightningModule
(tunelab.targets)."""

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning_utilities import apply_to_collection
from omegaconf import DictConfig
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel

from tunelab.kernels import model_loss
from tunelab.optim import build_optimizer, build_scheduler
from tunelab.targets import build_target


def rng_states() -> dict:
    """Every RNG a training step may draw from, in types torch.load(weights_only=True) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class FineTuningModule(pl.LightningModule):
    """A transformers model trained with tunelab's optimizer, schedule, sharding and checkpoints; a subclass gives the
    training and validation steps. `loss`: the training loss tunelab built for the kernels group, a callable
    (model, batch) -> loss (tunelab.kernels.build_loss)."""

    def __init__(self, model: PreTrainedModel, optim: DictConfig, adapter_only_checkpoints: bool = False,
                 loss=model_loss):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optim_cfg = optim
        self.adapter_only_checkpoints = adapter_only_checkpoints
        # Named before any wrapping: FSDP may replace the parameters by flat ones whose names match no state_dict key.
        self.trainable_keys = {f"model.{name}" for name, p in model.named_parameters() if p.requires_grad}
        # The frozen base of an adapter-only checkpoint is rebuilt from config, not loaded.
        self.strict_loading = not adapter_only_checkpoints

    def forward(self, **batch):
        return self.model(**batch)

    def configure_model(self) -> None:
        """strategy=fsdp shards the model here, once the ranks and their device mesh exist (tunelab.fsdp2)."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.model)

    def log_step(self, split: str, values: dict[str, torch.Tensor], batch_size: int, shown: tuple[str, ...] = ("loss",)
                 ) -> None:
        """`values` as <split>/<name>: each training step's own (no sync between ranks: the hot path stays free of
        collectives), a validation's mean over all its batches and ranks. Names in `shown` go on the progress bar."""
        per_step = {"on_step": True, "on_epoch": False} if split == "train" else {"sync_dist": True}
        for name, value in values.items():
            self.log(f"{split}/{name}", value, prog_bar=name in shown, batch_size=batch_size, **per_step)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        total_steps = self.optim_cfg.total_steps or self.trainer.estimated_stepping_batches
        scheduler = build_scheduler(optimizer, self.optim_cfg, int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after its forward pass, so the last step's
        # gradients (a model's worth of memory) would stay allocated through every forward; free them now.
        if type(self.trainer.strategy).__name__ != "DeepSpeedStrategy":  # DeepSpeed's engine owns its gradients
            optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        model = self.trainer.model
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            # Lightning's FSDP precision refuses norm clipping; FSDP's own clip takes the norm over all shards.
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        # A sharded FSDP checkpoint keeps the frozen base too: its loader reads back every key the model has.
        if self.adapter_only_checkpoints and getattr(self.trainer.strategy, "_state_dict_type", None) != "sharded":
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self.trainable_keys}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A sharded FSDP checkpoint's metadata (callback states among it) is rank 0's torch.save, which loads onto
        # cuda:0 on every rank; ModelCheckpoint would then compare rank 1's score on cuda:1 with best scores on cuda:0
        # and fail. This hook runs before callback states are restored, and CPU scalars mix with any device.
        if "callbacks" in checkpoint:
            checkpoint["callbacks"] = apply_to_collection(checkpoint["callbacks"], torch.Tensor, torch.Tensor.cpu)
        # Restored at the first step, not now: the fit loop is yet to open the training DataLoader, whose iterator
        # draws its base seed from torch's global RNG, a draw the unbroken run made at the epoch's start. Restored
        # here, every dropout mask after a mid-epoch resume differed from the unbroken run's.
        self.rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if getattr(self, "rng_states_to_restore", None) is not None:
            restore_rng_states(self.rng_states_to_restore)
            self.rng_states_to_restore = None


def build_module(cfg: DictConfig, model: PreTrainedModel, optim: DictConfig, **offered) -> pl.LightningModule:
    """`module._target_` with the module option's keys, the built model and the optim config; `offered` (the loss
    tunelab built, adapter_only_checkpoints) goes to a constructor that names it or takes **kwargs."""
    return build_target("module", cfg, model=model, optim=optim, **offered)
