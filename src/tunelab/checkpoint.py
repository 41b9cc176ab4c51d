"""Where a run resumes from (`ckpt_path`) and what it exports when done."""

from copy import deepcopy
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
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


def gather_fsdp_weights(wrapped: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, gathered from every FSDP shard into rank 0's CPU memory (other ranks get an empty
    dict), keyed as the transformers/PEFT model's own state_dict. `wrapped`: the strategy's model, FSDP around the
    LightningModule whose `model` is the transformers/PEFT one. Every rank must call it: each sends its shard.
    None where the model is not wrapped by FSDP, so rank 0 already holds all of it."""
    if not isinstance(wrapped, FullyShardedDataParallel):
        return None
    # Offloading a CPU-resident model frees the storage it copies from (gloo runs crash with "setStorage").
    gathered = FullStateDictConfig(offload_to_cpu=wrapped.compute_device.type != "cpu", rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, gathered):
        state = wrapped.state_dict()
    return {key.removeprefix("model."): value for key, value in state.items()}  # the LightningModule's `model`


def unwrapped_copy(model: PeftModel) -> PeftModel:
    """The same PEFT model without FSDP's wrappers, on the meta device: it holds no weights, only module names."""
    base = model.get_base_model()
    with torch.device("meta"):
        copy = get_peft_model(type(base)(base.config), deepcopy(model.peft_config[model.active_adapter]))
    copy.peft_config = model.peft_config  # as configured, base_model_name_or_path included
    return copy


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                      weights: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained of the fine-tuned model, or only of its LoRA adapter, next to its tokenizer; `weights` stand in
    for the model's own where those are shards (gather_fsdp_weights)."""
    if isinstance(model, PeftModel):
        if weights is not None:
            # PEFT picks the adapter's keys by walking the model's modules, whose names FSDP changed (`layers.0.
            # _fsdp_wrapped_module.self_attn...`) so that no gathered key would match: walk an unwrapped copy.
            model = unwrapped_copy(model)
        if not get_peft_model_state_dict(model, state_dict=weights):
            raise RuntimeError(f"export: no adapter weights found for {type(model.get_base_model()).__name__}; "
                               "nothing written (the checkpoints hold the trained adapter)")
    model.save_pretrained(directory, state_dict=weights)
    tokenizer.save_pretrained(directory)
    return directory
