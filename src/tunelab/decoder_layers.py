"""The model's repeated decoder-layer classes: the units FSDP wraps (strategy=fsdp1) or shards (strategy=fsdp, FSDP2)
one by one, and the layers kernels.compile=layers compiles one by one. Imports no torch: tunelab.strategy is read
before anything heavy loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The model's repeated block classes, as transformers declares them (`_no_split_modules`), e.g. LlamaDecoderLayer
    or Qwen2DecoderLayer. A PEFT wrapper forwards the attribute to the model it wraps."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(model).__name__} declares no decoder-layer class (_no_split_modules={sorted(names)}) that occurs in it; "
            "use strategy.auto_wrap=null"
        )
    return classes
