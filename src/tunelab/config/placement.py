"""Strategy, devices, precision and kernels against each other and against the hardware that is actually here."""

import importlib.util
import os
from typing import Any

from omegaconf import DictConfig, ListConfig

from tunelab.config.fields import is_kind
from tunelab.errors import ConfigError, show
from tunelab.kernel_choice import liger_available, resolve_kernels
from tunelab.precision import float8_gpu_problem
from tunelab.strategy import gpu_count, is_fsdp2, is_known_strategy, runs_on_gpu, shards_parameters, strategy_devices


def check_placement(cfg: DictConfig) -> None:
    """Strategy, devices and precision against the hardware that is actually here."""
    strategy, trainer = cfg.strategy, cfg.trainer
    if not is_known_strategy(strategy):
        raise ConfigError(f"strategy.name={strategy.name} is not a Lightning strategy: use an option of conf/strategy or give a _target_")
    devices = strategy_devices(strategy, trainer)
    check_devices(devices)
    gpus = gpu_count()
    uses_gpu = runs_on_gpu(strategy, trainer)
    check_sharding(strategy, uses_gpu)
    check_nodes(trainer.num_nodes, devices)
    if uses_gpu:
        wanted = gpus if devices in ("auto", -1) else (len(devices) if not isinstance(devices, int) else devices)
        if wanted > gpus or gpus == 0:
            raise ConfigError(f"strategy {strategy.name} needs {max(wanted, 1)} GPUs, found {gpus}")
    elif cfg.precision.value == "16-mixed":
        raise ConfigError("precision 16_mixed needs a GPU (fp16 autocast); on CPU use precision=bf16_mixed or 32_true")


def check_devices(devices: Any) -> None:
    """What Lightning takes: auto, a count (-1: all), or the indices of the devices to use."""
    count = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    indices = isinstance(devices, ListConfig) and len(devices) > 0 and all(is_kind(d, int) and d >= 0 for d in devices)
    if not (devices == "auto" or count or indices):
        raise ConfigError(f"trainer.devices={show(devices)} must be auto, a number of devices (-1 for all of them) "
                          "or a list of device indices, e.g. [0, 1]")


def check_sharding(strategy: DictConfig, uses_gpu: bool) -> None:
    target = str(strategy.get("_target_", ""))
    if target.endswith(("FSDPStrategy", "DeepSpeedStrategy")) and not uses_gpu:
        raise ConfigError(f"strategy {strategy.name} needs GPUs (Lightning's FSDP and DeepSpeed refuse CPU); on CPU use strategy=ddp trainer.accelerator=cpu")
    if is_fsdp2(strategy) and strategy.get("cpu_offload") and not uses_gpu:
        raise ConfigError(f"strategy.cpu_offload=true keeps {strategy.name}'s GPU state in CPU memory; this run is on the "
                          "CPU already: set strategy.cpu_offload=false")
    if target.endswith("DeepSpeedStrategy") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy {strategy.name} needs the deepspeed package: pip install 'tunelab[deepspeed]'")


def check_nodes(num_nodes: int, devices) -> None:
    """Several nodes need every process started from outside (torchrun on each node, or SLURM); under torchrun the
    process counts it was given must be the ones the config asks for."""
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


def check_fsdp_adapters(cfg: DictConfig) -> None:
    """A LoRA model's FSDP units hold flat parameters (tunelab.strategy), and Lightning can re-key a full optimizer
    state only by original parameters: it stops at the first checkpoint (seen on 2 H100s)."""
    if cfg.peft and str(cfg.strategy.get("_target_", "")).endswith("FSDPStrategy") and cfg.strategy.get("state_dict_type") == "full":
        raise ConfigError(f"peft=lora under strategy={cfg.strategy.name} writes sharded checkpoints only: set strategy.state_dict_type=sharded "
                          "(the export at the end of the run is still whole)")


def check_float8(cfg: DictConfig) -> None:
    """precision=fp8 against the rest of the run and the GPU that is here."""
    if not cfg.precision.get("float8"):
        return
    name = cfg.precision.get("name", "fp8")
    if cfg.precision.value != "bf16-true":
        raise ConfigError(f"precision={name} trains bfloat16 weights with float8 matmuls: it needs "
                          f"precision.value=bf16-true, not {cfg.precision.value}")
    if cfg.peft and cfg.peft.get("quantize_base") is not None:
        raise ConfigError(f"precision={name} does not combine with peft=qlora: the 4-bit base's matmuls are "
                          "bitsandbytes kernels, not float8 ones; use peft=lora (float8 base, bf16 adapters) or precision=bf16_true")
    if shards_parameters(cfg.strategy) and not is_fsdp2(cfg.strategy):
        raise ConfigError(f"precision={name} does not run under strategy={cfg.strategy.name} (its flat parameters hide "
                          "the float8 layers' weights): use strategy=fsdp (FSDP2), strategy=auto or strategy=ddp")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"precision={name} needs the torchao package: pip install 'tunelab[gpu]'")
    if cfg.precision.float8.emulate:
        return
    if not runs_on_gpu(cfg.strategy, cfg.trainer):
        raise ConfigError(f"precision={name} needs an NVIDIA GPU with float8 matmuls (compute capability 8.9+: H100, "
                          "H200, L4); this run is on the CPU: use precision=bf16_true, or precision.float8.emulate=true "
                          "to check float8 numerics slowly")
    if problem := float8_gpu_problem():
        raise ConfigError(f"precision={name}: {problem}; use precision=bf16_true")


def check_kernels(cfg: DictConfig) -> None:
    """What kernels=auto picks (tunelab.kernel_choice), against the adapter and the device."""
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
