"""Builds the `optim` group: AdamW with decay/no-decay parameter groups and a warmup-cosine schedule."""

import math

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; biases and norm weights (the 1-D ones) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    groups = [g for g in parameter_groups(model, cfg.weight_decay) if g["params"]]
    fused = cfg.fused if cfg.fused is not None else all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def warmup_steps(cfg: DictConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def warmup_cosine(total_steps: int, warmup: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear from 0 to 1 over `warmup` steps, then cosine down to min_lr_ratio."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        # Reaches min_lr_ratio exactly at the last optimizer step (index total_steps - 1).
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps(cfg, total_steps), cfg.min_lr_ratio))


def lr_area(steps: int, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Learning-rate area after `steps` optimizer steps of a warmup-cosine schedule, in units of the peak LR: the sum
    of the multipliers of the steps taken. Equal areas mean equal progress for trials whose schedules differ."""
    multiplier = warmup_cosine(total_steps, warmup, min_lr_ratio)
    return sum(multiplier(step) for step in range(steps))
