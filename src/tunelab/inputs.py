"""Opens what the config points at (the tokenizer, the data rows, the model's architecture) and checks them against
each other before the MLflow run starts and before any weights load: a bad data file, a model type transformers does
not know or a LoRA target the model does not have ends with one ConfigError line saying which file and row, or which
names, instead of a traceback mid-run.

Kept apart from tunelab.config, which reads the config alone: these checks need the tokenizer, transformers and peft,
and what they open (a Hub id, a data file) may be reachable only on the machine that runs the job. The data rows'
checks are the data package's own (tunelab.data.checks); the model's, on the meta device, are here.
"""

import re
import warnings

import torch
from omegaconf import DictConfig

from tunelab.data.checks import check_data_rows
from tunelab.errors import ConfigError, one_line, show


def load_tokenizer(model_cfg: DictConfig):
    from tunelab.model import build_tokenizer

    try:
        return build_tokenizer(model_cfg)
    except (OSError, ValueError) as error:
        key = "tokenizer" if model_cfg.tokenizer else "name_or_path"
        raise ConfigError(f"model.{key}={model_cfg[key]}: cannot load its tokenizer ({one_line(error)}); give a hub id "
                          "this machine can reach, a local save_pretrained directory, or model.tokenizer=char") from error


def check_inputs(cfg: DictConfig, tokenizer) -> None:
    check_data_rows(cfg.data, tokenizer)  # tunelab.data.checks
    check_architecture(cfg, tokenizer)


def check_architecture(cfg: DictConfig, tokenizer) -> None:
    """Builds the model on the meta device (no memory, no weights), with its adapters where peft asks for them."""
    from transformers import AutoModelForCausalLM

    config, source = model_config(cfg.model, tokenizer)
    check_attention(cfg.model.attn_implementation)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real build after this says them
            model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.model.attn_implementation,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    except Exception as error:  # whatever transformers refuses in this architecture is the config's to fix
        raise ConfigError(f"{source} (model.attn_implementation={cfg.model.attn_implementation}): transformers cannot "
                          f"build this model: {one_line(error)}") from error
    if cfg.peft:
        check_lora_targets(model, cfg.peft.target_modules)
        from tunelab.peft import apply_peft

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply_peft(model, cfg.peft)
        except Exception as error:  # whatever peft refuses in the adapter config, likewise
            raise ConfigError(f"peft: {one_line(error)}") from error


def check_attention(name: str) -> None:
    """transformers refuses an unknown attention with a paragraph listing every variant it has; one line says the fix."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name not in ALL_ATTENTION_FUNCTIONS.valid_keys() and "/" not in name:  # org/repo: a Hub kernel
        raise ConfigError(f"model.attn_implementation={name} is not an attention transformers has: use sdpa (the default), "
                          "eager, flex_attention or flash_attention_2 (pip install flash-attn)")


def model_config(model_cfg: DictConfig, tokenizer):
    """The transformers config the model is built from, and the config key that gave it."""
    from transformers import CONFIG_MAPPING, AutoConfig, __version__

    from tunelab.model import architecture_config

    if model_cfg.init == "random" and model_cfg.config is not None:
        model_type = model_cfg.config.model_type
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"model.config.model_type={model_type} is not a model type of transformers {__version__}: "
                              "e.g. llama, qwen2, mistral, gemma2")
        try:
            return architecture_config(model_cfg, tokenizer), "model.config"
        except Exception as error:  # the config class's own validation of its fields
            raise ConfigError(f"model.config: {one_line(error)}") from error
    source = f"model.name_or_path={model_cfg.name_or_path}"
    try:
        return AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code), source
    except (OSError, ValueError) as error:
        raise ConfigError(f"{source}: cannot load its config.json ({one_line(error)}); give a hub id this machine can "
                          "reach (HF_HUB_OFFLINE=1 uses a cached copy) or a local save_pretrained directory") from error


def check_lora_targets(model: torch.nn.Module, targets) -> None:
    """Each name in peft.target_modules matches a layer peft can adapt, as peft matches them: the whole name or its
    last dotted parts (a string is a regular expression over whole names). peft itself refuses only when none
    matches, and names what it matched in a multi-line repr of the module."""
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    names = [name for name, module in model.named_modules() if isinstance(module, adaptable)]
    if isinstance(targets, str):
        try:
            if targets == "all-linear" or any(re.fullmatch(targets, name) for name in names):
                return
        except re.error as error:
            raise ConfigError(f"peft.target_modules={targets} is not a regular expression ({error}): give a list of "
                              "module names, e.g. [q_proj, v_proj]") from error
        missing = [targets]
    else:
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        layers = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ConfigError(f"peft.target_modules={show(targets)}: the model has no linear or embedding layer named "
                          f"{', '.join(missing)}; those it has are {', '.join(layers)}")
