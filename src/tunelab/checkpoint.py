"""Where a run resumes from (`ckpt_path`) and what it exports when done."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import ConfigError


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last`: this run dir's last.ckpt if it has one (a re-run sweep trial), else the newest under outputs/."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.exists():  # a file, or the directory of a sharded FSDP checkpoint
        return str(own)
    candidates = sorted(Path(cfg.paths.root, "outputs").glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no checkpoints/last.ckpt under {Path(cfg.paths.root, 'outputs')}; give a path")
    return str(candidates[-1])


def gather_fsdp_weights(trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, gathered from every FSDP shard into rank 0's CPU memory (other ranks get an empty
    dict), keyed as the transformers/PEFT model's own state_dict. Every rank must call it: each sends its shard.
    None where the model is not wrapped by FSDP, so rank 0 already holds all of it."""
    wrapped = trainer.strategy.model
    if not isinstance(wrapped, FullyShardedDataParallel):
        return None
    gathered = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, gathered):
        state = wrapped.state_dict()
    return {key.removeprefix("model."): value for key, value in state.items()}  # the LightningModule's `model`


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                      weights: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained of the fine-tuned model, or only of its LoRA adapter, next to its tokenizer; `weights` stand in
    for the model's own where those are shards (gather_fsdp_weights)."""
    model.save_pretrained(directory, state_dict=weights)
    tokenizer.save_pretrained(directory)
    return directory
