"""Builds the `strategy` group: a Lightning strategy plus the devices it runs on.

`fsdp` and `fsdp8` are FSDP2 (tunelab.fsdp2.FSDP2Strategy); `fsdp1` is Lightning's FSDPStrategy (FSDP1), which gets
two tunelab keys on top of its own arguments: `auto_wrap: decoder_layers` wraps each decoder layer of whatever model is
loaded (the classes transformers lists in `_no_split_modules`), and `activation_checkpointing: true` recomputes those
same layers in the backward pass.

Validation reads the placement functions here before anything heavy loads, so torch and Lightning are imported only
inside the functions that build (`gpu_count` asks torch only where a GPU can exist).
"""

from __future__ import annotations

import os
from glob import glob
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tunelab.decoder_layers import decoder_layer_classes

if TYPE_CHECKING:
    import torch
    from lightning.pytorch.strategies import Strategy

# Keys of a strategy option that describe where it runs rather than arguments of the strategy class.
PLACEMENT_KEYS = ("name", "devices", "accelerator")
# Keys tunelab turns into FSDPStrategy arguments once the model is known.
FSDP_MODEL_KEYS = ("auto_wrap", "activation_checkpointing")
AUTO_WRAP_CHOICES = (None, "decoder_layers")
# The names in Lightning's StrategyRegistry (2.6), so a strategy.name is checked without importing Lightning;
# tests/test_cli.py holds this list to the registry of the Lightning installed.
LIGHTNING_STRATEGIES = (
    "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "ddp_fork",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true", "ddp_notebook",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true", "ddp_spawn",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1",
    "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload", "single_device", "single_tpu", "single_xla", "xla",
    "xla_debug",
)
# The strategies that shard parameters over ranks (no rank holds the whole model after setup).
FSDP1_TARGET, FSDP2_TARGET = "lightning.pytorch.strategies.FSDPStrategy", "tunelab.fsdp2.FSDP2Strategy"
SHARDING_TARGETS = (FSDP1_TARGET, FSDP2_TARGET, "lightning.pytorch.strategies.DeepSpeedStrategy")
# Device nodes without which no process sees a GPU: NVIDIA's driver, WSL's GPU paravirtualisation, AMD's ROCm.
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")


def may_have_gpus() -> bool:
    return "CUDA_VISIBLE_DEVICES" in os.environ or any(glob(pattern) for pattern in GPU_DEVICE_NODES)


def gpu_count() -> int:
    """The GPUs torch sees. Importing torch to learn there are none costs seconds, so where none can be there is no
    need to ask it."""
    if not may_have_gpus():
        return 0
    import torch

    return torch.cuda.device_count()


def strategy_devices(cfg: DictConfig, trainer_cfg: DictConfig):
    """The devices value the Trainer gets: the strategy's own (fsdp8 means 8) or trainer.devices."""
    return cfg.get("devices") or trainer_cfg.devices


def strategy_accelerator(cfg: DictConfig, trainer_cfg: DictConfig) -> str:
    return cfg.get("accelerator") or trainer_cfg.accelerator


def runs_on_gpu(cfg: DictConfig, trainer_cfg: DictConfig) -> bool:
    """Whether the run's accelerator is a CUDA GPU: named so, or `auto` on a machine that has one."""
    accelerator = strategy_accelerator(cfg, trainer_cfg)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpu_count() > 0)


def strategy_target(cfg: DictConfig) -> str:
    return str(cfg.get("_target_", ""))


def shards_parameters(cfg: DictConfig) -> bool:
    """Whether the strategy option shards the model's parameters over its ranks (FSDP2, FSDP1, DeepSpeed)."""
    return strategy_target(cfg) in SHARDING_TARGETS


def is_fsdp2(cfg: DictConfig) -> bool:
    return strategy_target(cfg) == FSDP2_TARGET


def shards_model(strategy: Strategy) -> bool:
    """Whether a built strategy holds only a shard of the model on each rank, so that every forward needs all ranks."""
    return type(strategy).__name__ in ("FSDPStrategy", "FSDP2Strategy", "DeepSpeedStrategy")


def launch_rank() -> int:
    """This process's global rank before any process group exists: torchrun's RANK, SLURM's task id, or Lightning's
    launcher's LOCAL_RANK (its first process, which starts the others, has none: rank 0)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def build_device(cfg: DictConfig, on_gpu: bool) -> torch.device | None:
    """Where the model is built. FSDP2: on rank 0's CPU, and on the meta device (no memory) on every other rank, whose
    shards rank 0 then fills (tunelab.fsdp2). Otherwise straight on this process's GPU (LOCAL_RANK, as torchrun and
    Lightning's launcher set it) when the strategy keeps a whole copy on each, which initialises a 1B model in a
    second instead of half a minute on the CPU; None (the CPU) for the other sharding strategies, which shard from
    there."""
    import torch

    if is_fsdp2(cfg):
        return None if launch_rank() == 0 else torch.device("meta")
    if not on_gpu or shards_parameters(cfg):
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def is_known_strategy(cfg: DictConfig) -> bool:
    """An option either names its class (`_target_`) or one of Lightning's registered strategy names."""
    return "_target_" in cfg or cfg.name == "auto" or cfg.name in LIGHTNING_STRATEGIES


def has_frozen_parameters(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def is_trainable_leaf(module: torch.nn.Module) -> bool:
    parameters = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(parameters) and all(p.requires_grad for p in parameters)


def wrap_policy(layers: set[type[torch.nn.Module]], model: torch.nn.Module):
    """One FSDP unit per decoder layer; with a frozen base (LoRA), each trainable leaf (an adapter matrix) gets a unit
    of its own, so frozen and trainable weights never share one and gradients are kept only for the adapters."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    if not has_frozen_parameters(model):
        return layers
    return CustomPolicy(lambda module: type(module) in layers or is_trainable_leaf(module))


def fsdp2_dtypes(cfg: DictConfig, precision: str) -> dict[str, str | None]:
    """FSDP2's mixed-precision policy from the precision group where the option says `auto`: under bf16_mixed the
    parameters stay float32 (the optimizer's master copy) and are gathered for compute in bfloat16, with gradients
    reduced in float32; otherwise parameters compute and reduce in their own dtype (bf16_true: bfloat16)."""
    mixed = precision == "bf16-mixed"
    dtypes = {"param_dtype": "bfloat16" if mixed else None, "reduce_dtype": "float32" if mixed else None}
    return {key: auto if cfg.get(key, "auto") == "auto" else cfg.get(key) for key, auto in dtypes.items()}


def build_strategy(cfg: DictConfig, model: torch.nn.Module | None = None, precision: str = "32-true") -> Strategy | str:
    if "_target_" not in cfg:
        return cfg.name
    arguments = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in PLACEMENT_KEYS}
    if is_fsdp2(cfg):
        from tunelab.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(**{**{k: v for k, v in arguments.items() if k != "_target_"}, **fsdp2_dtypes(cfg, precision)})
    auto_wrap = arguments.pop("auto_wrap", None)
    checkpointing = arguments.pop("activation_checkpointing", False)
    from_model = {}
    if auto_wrap == "decoder_layers" or checkpointing:
        if model is None:
            raise ValueError(f"strategy {cfg.name}: auto_wrap and activation_checkpointing need the model")
        layers = decoder_layer_classes(model)
        if auto_wrap == "decoder_layers":
            from_model["auto_wrap_policy"] = wrap_policy(layers, model)
            if has_frozen_parameters(model):
                # Original-parameter views of a unit whose tied weights are all frozen (a LoRA model's root: embedding
                # and lm_head) break FSDP's reshard (AssertionError "as_params=True type(prim_param)"); flat parameters
                # avoid that path, and every unit is uniform in requires_grad as they need.
                arguments.setdefault("use_orig_params", False)
        if checkpointing:
            from_model["activation_checkpointing_policy"] = layers
    # Classes are no config values: bind the YAML arguments first, then add the policies as plain objects.
    partial = instantiate(arguments, _partial_=True, _convert_="all", _execution_whitelist_=["lightning.pytorch.strategies.*", "tunelab.ddp.*"])
    return partial(**from_model)
