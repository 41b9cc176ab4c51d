"""Runs that fail in a way the user can act on end with one line saying what to change, not a traceback: a diverged
run (tunelab.callbacks.DivergenceGuard), a GPU that ran out of memory, and data found unusable only as it is
tokenized (a chat template that rewrites earlier turns in a row the up-front check did not reach), and a reward
function (module=grpo) that returns other than one number per completion."""

import torch
from lightning.pytorch import Trainer
from omegaconf import DictConfig

from tunelab.callbacks import TrainingDiverged
from tunelab.data.chat import TemplateRewritesTurns
from tunelab.rewards import RewardError
from tunelab.strategy import shards_parameters

# How CUDA libraries report an allocation that failed; cuBLAS's comes as a plain RuntimeError.
OUT_OF_MEMORY_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS)


def out_of_memory_advice(cfg: DictConfig, trainer: Trainer) -> str:
    """What ran out, and the switches that lower memory which this run has not turned on yet."""
    data = cfg.data
    fixes = [f"lower data.batch_size (now {data.batch_size}; raise trainer.accumulate_grad_batches to keep the "
             "effective batch)", f"lower data.max_length (now {data.max_length})"]
    if not cfg.model.get("gradient_checkpointing"):
        fixes.append("set model.gradient_checkpointing=true")
    if not data.get("packing") and data.get("source") != "random_tokens":
        fixes.append("set data.packing=true (no padding)")
    if not cfg.peft:
        fixes.append("train adapters only (peft=lora)")
    if not shards_parameters(cfg.strategy) and trainer.world_size > 1:
        fixes.append("shard the model over the GPUs (strategy=fsdp)")
    memory = ""
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        memory = (f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB in use at the peak of "
                  f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)")
    return f"out of GPU memory at step {trainer.global_step}{memory}: " + ", or ".join(fixes)


def explain_failure(error: BaseException, cfg: DictConfig, trainer: Trainer) -> str | None:
    """The one line for a failure the user can act on, or None for one whose traceback is the best report."""
    if isinstance(error, (TrainingDiverged, TemplateRewritesTurns, RewardError)):
        return str(error)
    if is_out_of_memory(error):
        return out_of_memory_advice(cfg, trainer)
    return None
