"""Builds the `precision` group: Lightning's precision flag, the dtype model weights load in, and (precision=fp8)
float8 matmuls in the decoder's linear layers.

Float8 training is torchao's (`convert_to_float8_training`): each chosen `nn.Linear` becomes a `Float8Linear` that
keeps its bf16 weight (the master copy the optimizer updates, and the state_dict key it always had) and casts input,
weight and output gradient to float8 with dynamic scales for each of its three matmuls. The output projection
(`lm_head`, which the fused loss reads as a plain weight) and LoRA's adapter matrices stay bf16 always; `layers: auto`
also leaves the small matrices bf16 by torchao's size thresholds for the recipe, measured on H100s, where the casts
cost more than the float8 matmul saves. Under LoRA the frozen base's matmuls run in float8; the adapters in bf16.
"""

import logging

from omegaconf import DictConfig

log = logging.getLogger(__name__)

FLOAT8_RECIPES = ("tensorwise", "rowwise")
FLOAT8_LAYERS = ("auto", "all")
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first with float8 tensor cores
ADAPTER_MODULES = ("lora_", "modules_to_save")  # peft's adapter sub-modules, by their names


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


def apply_float8(model, precision: DictConfig):
    """The model with float8 matmuls in its chosen linear layers (in place; state_dict keys unchanged), or the model
    as it is where the precision option asks for none. Call it after the adapters are added (their matrices must be
    told apart from the base's) and before layers are compiled."""
    options = precision.get("float8")
    if not options:
        return model
    from dataclasses import replace

    from torch import nn

    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    # torchao warns at import about C++ extensions built for another torch (its mx and int kernels): float8 training
    # is pure PyTorch and needs none of them.
    torchao_log.setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        # torchao's own size thresholds for each recipe (what torchtitan filters with); a private name, used only here.
        from torchao.float8.float8_linear_utils import _auto_filter_for_recipe
    finally:
        torchao_log.setLevel(level)

    head = model.get_output_embeddings()
    fits_recipe = _auto_filter_for_recipe(options.recipe, filter_fqns=[])
    kept = {"output projection": 0, "adapter": 0, "size": 0}

    def converts(module: nn.Module, name: str) -> bool:
        if type(module) is not nn.Linear:
            return False
        if module is head:
            kept["output projection"] += 1
        elif any(part in name for part in ADAPTER_MODULES):
            kept["adapter"] += 1
        elif not (all(size % 16 == 0 for size in module.weight.shape) and  # float8 matmuls' own requirement
                  (options.layers == "all" or fits_recipe(module, name))):
            kept["size"] += 1
        else:
            return True
        return False

    config = replace(Float8LinearConfig.from_recipe_name(options.recipe), emulate=bool(options.emulate))
    convert_to_float8_training(model, config=config, module_filter_fn=converts)
    converted = sum(type(module).__name__ == "Float8Linear" for module in model.modules())
    if converted == 0:
        log.warning("precision: float8 asked for, but no linear layer of this model is large enough for the %s "
                    "recipe's thresholds: every matmul stays bf16 (precision.float8.layers=all converts every "
                    "layer whose sizes are multiples of 16)", options.recipe)
    log.info("precision: float8 %s%s matmuls in %d linear layers; bf16 kept for %s", options.recipe,
             " (emulated)" if options.emulate else "", converted,
             ", ".join(f"{count} {why}" for why, count in kept.items() if count) or "none")
    return model
