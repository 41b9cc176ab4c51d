"""Checks the whole composed config once, up front, before anything heavy is imported or loaded.

Every problem is reported as one ConfigError line that says what is wrong and how to fix it.
"""

import importlib.util
import logging
import os
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.precision import precision_warnings
from tunelab.strategy import AUTO_WRAP_CHOICES, is_known_strategy, runs_on_gpu, strategy_devices

log = logging.getLogger(__name__)

PRECISIONS = {"32-true", "bf16-true", "bf16-mixed", "16-mixed"}
PROFILERS = {None, "simple", "advanced", "pytorch"}
VALIDATION_METRICS = {"val/loss", "val/exact_match"}


class ConfigError(ValueError):
    pass


def validate_config(cfg: DictConfig) -> None:
    for check in (check_model, check_data, check_peft, check_kernels, check_optim, check_fsdp_adapters, check_placement,
                  check_run):
        check(cfg)
    for warning in precision_warnings(cfg.precision, cfg.model):
        log.warning(warning)


def looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).exists()


def check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if model.init not in ("pretrained", "random"):
        raise ConfigError(f"model.init={model.init} is not one of: pretrained, random")
    if model.init == "pretrained" and not model.name_or_path:
        raise ConfigError("model.init=pretrained needs model.name_or_path (a hub id or a local directory)")
    if model.init == "random" and model.config is None and not model.name_or_path:
        raise ConfigError("model.init=random needs a model.config block or a model.name_or_path to take the architecture from")
    for key in ("name_or_path", "tokenizer"):
        value = model.get(key)
        if value and value != "char" and looks_local(value):
            path = Path(value).expanduser()
            if not (path / ("config.json" if key == "name_or_path" else "")).exists():
                raise ConfigError(f"model.{key}={value}: no such local model directory (it needs the files save_pretrained writes)")
    if model.tokenizer is None and not model.name_or_path:
        raise ConfigError("model.tokenizer is null and there is no model.name_or_path to load it from: set model.tokenizer=char")
    if model.dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={model.dtype} is not one of: null, float32, bfloat16, float16")


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    if data.source == "random_tokens":
        if data.batch_size < 1 or data.max_length < 2 or data.num_examples < data.batch_size or data.val_size < 1:
            raise ConfigError("data=random_tokens needs batch_size >= 1, max_length >= 2, num_examples >= batch_size, val_size >= 1")
        return
    if data.source not in ("tiny", "hub", "jsonl", "random_tokens"):
        raise ConfigError(f"data.source={data.source} is not one of: tiny, hub, jsonl, random_tokens")
    if data.source == "jsonl" and (OmegaConf.is_missing(data, "path") or not Path(str(data.path)).expanduser().is_file()):
        path = "???" if OmegaConf.is_missing(data, "path") else data.path
        raise ConfigError(f"data.path={path}: no such file; data=jsonl needs data.path=/path/to/rows.jsonl")
    if data.format not in ("alpaca", "chat", "auto"):
        raise ConfigError(f"data.format={data.format} is not one of: alpaca, chat, auto")
    if data.batch_size < 1 or data.max_length < 2:
        raise ConfigError("data.batch_size must be >= 1 and data.max_length >= 2")
    if not data.val_size > 0:
        raise ConfigError(f"data.val_size={data.val_size}: hold out a fraction (< 1) or a number of examples (>= 1)")


def check_peft(cfg: DictConfig) -> None:
    if cfg.peft and (cfg.peft.get("r", 1) < 1 or not cfg.peft.get("target_modules")):
        raise ConfigError("peft=lora needs peft.r >= 1 and a non-empty peft.target_modules")
    if cfg.peft and cfg.peft.get("quantize_base") is not None:
        if cfg.model.init != "pretrained":
            raise ConfigError("peft=qlora quantizes the base model as its weights load: it needs model.init=pretrained "
                              "(model.name_or_path a hub id or a local save_pretrained directory)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("peft=qlora needs the bitsandbytes package: pip install 'tunelab[qlora]'")
        if str(cfg.strategy.get("_target_", "")).endswith(("FSDPStrategy", "DeepSpeedStrategy")):
            raise ConfigError(f"peft=qlora does not run under strategy={cfg.strategy.name}: use strategy=auto (one device) or strategy=ddp")


def check_kernels(cfg: DictConfig) -> None:
    from tunelab.kernels import COMPILES, FUSED_OPS, LOSSES, liger_available, resolve_kernels

    kernels = cfg.kernels
    for key, choices in (("loss", LOSSES), ("compile", COMPILES), ("fused_ops", FUSED_OPS)):
        if kernels[key] not in choices:
            raise ConfigError(f"kernels.{key}={kernels[key]} is not one of: {', '.join(choices)}")
    if not isinstance(kernels.loss_chunk_size, int) or kernels.loss_chunk_size < 1:
        raise ConfigError(f"kernels.loss_chunk_size={kernels.loss_chunk_size} must be an integer >= 1")
    on_gpu = runs_on_gpu(cfg.strategy, cfg.trainer)
    chosen = resolve_kernels(cfg)
    if chosen["loss"] != "plain" and cfg.peft and "lm_head" in (cfg.peft.get("target_modules") or []):
        raise ConfigError("peft.target_modules has lm_head, which the fused loss reads as a plain weight: "
                          "use kernels.loss=plain, or drop lm_head from the targets")
    for key in ("loss", "fused_ops"):
        if chosen[key] != "liger":
            continue
        if not liger_available():
            raise ConfigError(f"kernels.{key}=liger needs the liger-kernel package: pip install liger-kernel")
        if not on_gpu:
            raise ConfigError(f"kernels.{key}=liger runs on CUDA GPUs only (Triton kernels): on CPU use "
                              f"kernels.{key}={'chunked' if key == 'loss' else 'none'}")


def check_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    if not optim.lr > 0:
        raise ConfigError(f"optim.lr={optim.lr} must be > 0")
    if optim.warmup_steps is not None and optim.warmup_ratio:
        raise ConfigError("give optim.warmup_steps or optim.warmup_ratio, not both (set the other to null)")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be within [0, 1]")


def check_placement(cfg: DictConfig) -> None:
    """Strategy, devices and precision against the hardware that is actually here."""
    strategy, trainer = cfg.strategy, cfg.trainer
    if cfg.precision.value not in PRECISIONS:
        raise ConfigError(f"precision {cfg.precision.value} is not one of: {', '.join(sorted(PRECISIONS))}")
    if not is_known_strategy(strategy):
        raise ConfigError(f"strategy.name={strategy.name} is not a Lightning strategy: use an option of conf/strategy or give a _target_")
    devices = strategy_devices(strategy, trainer)
    gpus = torch.cuda.device_count()
    uses_gpu = runs_on_gpu(strategy, trainer)
    check_sharding(strategy, uses_gpu)
    check_nodes(trainer.num_nodes, devices)
    if uses_gpu:
        wanted = gpus if devices in ("auto", -1) else (len(devices) if not isinstance(devices, int) else devices)
        if wanted > gpus or gpus == 0:
            raise ConfigError(f"strategy {strategy.name} needs {max(wanted, 1)} GPUs, found {gpus}")
    elif cfg.precision.value == "16-mixed":
        raise ConfigError("precision 16_mixed needs a GPU (fp16 autocast); on CPU use precision=bf16_mixed or 32_true")
    if trainer.profiler not in PROFILERS:
        raise ConfigError(f"trainer.profiler={trainer.profiler} is not one of: null, simple, advanced, pytorch")


def check_sharding(strategy: DictConfig, uses_gpu: bool) -> None:
    target = str(strategy.get("_target_", ""))
    if target.endswith(("FSDPStrategy", "DeepSpeedStrategy")) and not uses_gpu:
        raise ConfigError(f"strategy {strategy.name} needs GPUs (Lightning's FSDP and DeepSpeed refuse CPU); on CPU use strategy=ddp trainer.accelerator=cpu")
    if target.endswith("DeepSpeedStrategy") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy {strategy.name} needs the deepspeed package: pip install 'tunelab[deepspeed]'")
    if strategy.get("auto_wrap", None) not in AUTO_WRAP_CHOICES:
        raise ConfigError(f"strategy.auto_wrap={strategy.auto_wrap} is not one of: null, decoder_layers")
    if strategy.get("state_dict_type", "full") not in ("full", "sharded"):
        raise ConfigError(f"strategy.state_dict_type={strategy.state_dict_type} is not one of: full, sharded")


def check_fsdp_adapters(cfg: DictConfig) -> None:
    """A LoRA model's FSDP units hold flat parameters (tunelab.strategy), and Lightning can re-key a full optimizer
    state only by original parameters: it stops at the first checkpoint (seen on 2 H100s)."""
    if cfg.peft and str(cfg.strategy.get("_target_", "")).endswith("FSDPStrategy") and cfg.strategy.get("state_dict_type") == "full":
        raise ConfigError("peft=lora under strategy=fsdp writes sharded checkpoints only: set strategy.state_dict_type=sharded "
                          "(the export at the end of the run is still whole)")


def check_nodes(num_nodes, devices) -> None:
    """Several nodes need every process started from outside (torchrun on each node, or SLURM); under torchrun the
    process counts it was given must be the ones the config asks for."""
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes} must be an integer >= 1")
    torchrun = "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ
    if num_nodes > 1 and not torchrun and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} needs a multi-node launch: torchrun --nnodes={num_nodes} on every node, "
            "or hydra/launcher=submitit_slurm (docs/scale-out.md)"
        )
    if torchrun and isinstance(devices, int):
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        if (local, world) != (devices, devices * num_nodes):
            raise ConfigError(
                f"torchrun started {local} processes per node, {world} in all, but the config asks for "
                f"devices={devices} x num_nodes={num_nodes}: make --nproc-per-node and --nnodes match"
            )


def check_run(cfg: DictConfig) -> None:
    if cfg.objective.mode not in ("min", "max"):
        raise ConfigError(f"objective.mode={cfg.objective.mode} is not one of: min, max")
    if cfg.objective.metric not in VALIDATION_METRICS:
        raise ConfigError(f"objective.metric={cfg.objective.metric} is not one of: {', '.join(sorted(VALIDATION_METRICS))}")
    if cfg.ckpt_path not in (None, "last"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.exists():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint (or use ckpt_path=last)")
        if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes zip archives; sharded ones are dirs
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a PyTorch checkpoint (truncated or another kind of file)")
