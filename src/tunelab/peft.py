"""Builds the `peft` group: wraps the model with LoRA adapters, or leaves it whole for a full fine-tune.

`peft=qlora` adds `quantize_base`, a transformers.BitsAndBytesConfig the base model loads with (tunelab.model).
"""

from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

QUANTIZATION_KEY = "quantize_base"


def base_quantization(cfg: DictConfig) -> BitsAndBytesConfig | None:
    """How the base model's weights are quantized as they load (QLoRA), or None to load them as they are."""
    if not cfg or cfg.get(QUANTIZATION_KEY) is None:
        return None
    return instantiate(cfg[QUANTIZATION_KEY], _convert_="all", _execution_whitelist_=["transformers.BitsAndBytesConfig"])


def apply_peft(model: PreTrainedModel, cfg: DictConfig) -> PreTrainedModel:
    if not cfg:
        return model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Freezes the quantized base and keeps its remaining weights (norms, embeddings) in float32; gradient
        # checkpointing, when the model group asks for it, is already on.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # transformers 5.x renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # With a frozen embedding no activation entering the checkpointed blocks requires grad, and the
        # adapters inside them would get none.
        model.enable_input_require_grads()
    adapter = {key: value for key, value in cfg.items() if key != QUANTIZATION_KEY}
    return get_peft_model(model, instantiate(adapter, _convert_="all", _execution_whitelist_=["peft.*"]))
