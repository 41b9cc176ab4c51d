"""The `precision` group: Lightning's precision flag and the dtype model weights load in."""

import logging

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def precision_warnings(precision: DictConfig, model: DictConfig) -> list[str]:
    warnings = []
    if precision.value == "bf16-mixed" and model.dtype == "bfloat16":
        warnings.append(
            "precision=bf16_mixed over weights loaded in bfloat16 autocasts bf16 into bf16: no fp32 master weights, "
            "only the autocast overhead. Use precision=bf16_true for pure bf16, or model.dtype=null for real mixed precision."
        )
    return warnings
