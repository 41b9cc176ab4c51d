"""The `precision` group: Lightning's precision flag, the dtype model weights load in, and what precision=fp8 needs
of the machine. tunelab.float8 builds the float8 layers (it imports torch and torchao; this module is read by the
config checks before anything heavy loads)."""

import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

FLOAT8_RECIPES = ("tensorwise", "rowwise")
FLOAT8_LAYERS = ("auto", "all")
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first with float8 tensor cores


def precision_warnings(precision: DictConfig, model: DictConfig) -> list[str]:
    warnings = []
    if precision.value == "bf16-mixed" and model.dtype == "bfloat16":
        warnings.append(
            "precision=bf16_mixed over weights loaded in bfloat16 autocasts bf16 into bf16: no fp32 master weights, "
            "only the autocast overhead. Use precision=bf16_true for pure bf16, or model.dtype=null for real mixed precision."
        )
    return warnings


def float8_gpu_problem() -> str | None:
    """Why this machine's GPU cannot run float8 matmuls, or None when it can."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < FLOAT8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; float8 matmuls need 8.9 or "
                "newer (H100, H200, L4, RTX 4090)")
    return None


def apply_float8(model: "nn.Module", precision: DictConfig) -> "nn.Module":
    """The model with float8 matmuls where precision=fp8 asks for them, else the model as it is (torchao is imported
    only then). Call it after the adapters are added (their matrices must be told apart from the base's) and before
    layers are compiled."""
    options = precision.get("float8")
    if not options:
        return model
    from tunelab.float8 import convert_to_float8

    return convert_to_float8(model, options)
