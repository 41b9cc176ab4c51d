"""Builds the `peft` group: wraps the model with LoRA adapters, or leaves it whole for a full fine-tune."""

from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model
from transformers import PreTrainedModel


def apply_peft(model: PreTrainedModel, cfg: DictConfig) -> PreTrainedModel:
    if not cfg:
        return model
    if getattr(model, "is_gradient_checkpointing", False):
        # With a frozen embedding no activation entering the checkpointed blocks requires grad, and the
        # adapters inside them would get none.
        model.enable_input_require_grads()
    return get_peft_model(model, instantiate(cfg, _convert_="all", _execution_whitelist_=["peft.*"]))
