"""precision=fp8: float8 matmuls in the decoder's linear layers, through torchao's float8 training.

torchao's `Float8Linear` keeps its bf16 weight (the master copy the optimizer updates, under the state_dict key it
always had) and casts input, weight and output gradient to float8 with dynamic scales for each of its three matmuls.
The output projection (`lm_head`, which the fused loss reads as a plain weight) and LoRA's adapter matrices are never
converted; `layers: auto` also leaves the small matrices bf16 by torchao's size thresholds for the recipe (measured
on H100s: there the casts cost more than the float8 matmul saves). Under LoRA the frozen base's matmuls run in
float8 and the adapters do not; compiled, the frozen weights' gradient matmul is dropped from the graph.

Float8 is a training-step trick: each call casts the weight anew (a pass over it to find its scale), which a training
step's large matmuls repay and a decoding step's one-token matmuls do not. So where no gradient is taken (validation,
generated samples, DPO's reference pass) the layers run the plain bf16 matmul of the weights they hold: the model
validated is the bf16 model exported. On one H100 a 300-step run with float8 in its validations too spent 210 s in
fit against bf16's 100 s, at the same training-step speed (BENCHMARKS.md, 2026-12-07).
"""

import logging
from dataclasses import replace

import torch
from omegaconf import DictConfig
from torch import nn


log = logging.getLogger(__name__)

ADAPTER_MODULES = ("lora_", "modules_to_save")  # peft's adapter sub-modules, by their names

_torchao_log = logging.getLogger("torchao")
_level = _torchao_log.level
# torchao warns at import about its C++ extensions (mx and int kernels) where they were built for another torch:
# float8 training is pure PyTorch and needs none of them.
_torchao_log.setLevel(logging.ERROR)
try:
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    # torchao's size thresholds for each recipe (what torchtitan filters with): a private name, used only here.
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe, swap_linear_layers
finally:
    _torchao_log.setLevel(_level)


class Float8TrainingLinear(Float8Linear):
    """torchao's Float8Linear where a gradient is taken; the plain bf16 matmul elsewhere (see the module doc)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(input)
        return nn.functional.linear(input, self.weight, self.bias)


def convert_to_float8(model: nn.Module, options: DictConfig) -> nn.Module:
    """The model with float8 matmuls in the linear layers `options` (precision.float8) choose, in place; state_dict
    keys unchanged."""
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
    swap_linear_layers(model, lambda linear: Float8TrainingLinear.from_float(linear, config=config),
                       module_filter_fn=converts)
    converted = sum(isinstance(module, Float8Linear) for module in model.modules())
    if converted == 0:
        log.warning("precision: float8 asked for, but no linear layer of this model is large enough for the %s "
                    "recipe's thresholds: every matmul stays bf16 (precision.float8.layers=all converts every "
                    "layer whose sizes are multiples of 16)", options.recipe)
    log.info("precision: float8 %s%s matmuls in %d linear layers; bf16 kept for %s", options.recipe,
             " (emulated)" if options.emulate else "", converted,
             ", ".join(f"{count} {why}" for why, count in kept.items() if count) or "none")
    return model
