"""The model and peft groups: where the weights, the tokenizer and the chat template come from, and the adapter."""

import importlib.util
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from tunelab.errors import ConfigError, show
from tunelab.strategy import shards_parameters


def looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).exists()


def check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if model.init == "pretrained" and not model.name_or_path:
        raise ConfigError("model.init=pretrained needs model.name_or_path (a hub id or a local directory)")
    if model.init == "random" and model.config is None and not model.name_or_path:
        raise ConfigError("model.init=random needs a model.config block or a model.name_or_path to take the architecture from")
    if model.config is not None and not model.config.get("model_type"):
        raise ConfigError("model.config has no model_type: give the transformers model type in model.config.model_type, e.g. llama")
    for key, files in (("name_or_path", ["config.json"]), ("tokenizer", ["tokenizer.json", "tokenizer_config.json"])):
        value = model.get(key)
        if value and value != "char" and looks_local(value):
            path = Path(value).expanduser()
            if not any((path / name).exists() for name in files):
                raise ConfigError(f"model.{key}={value}: no such local {'model' if key == 'name_or_path' else 'tokenizer'} "
                                  f"directory (it needs the files save_pretrained writes: {' or '.join(files)})")
    if model.get("chat_template") is not None:
        chat_template_text(model.chat_template)  # a file that is not there is told now
    if model.tokenizer is None and not model.name_or_path:
        raise ConfigError("model.tokenizer is null and there is no model.name_or_path to load it from: set model.tokenizer=char")


def chat_template_text(value: str) -> str:
    """model.chat_template's Jinja: the value itself where it holds Jinja tags, else the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={value}: no such file, and not a Jinja template either (no {{{{ or "
                          "{%): give the template itself or the path of a file holding it")
    return path.read_text(encoding="utf-8")


def check_peft(cfg: DictConfig) -> None:
    if not cfg.peft:
        return
    targets = cfg.peft.get("target_modules")
    names = [targets] if isinstance(targets, str) else targets
    if not isinstance(names, (ListConfig, list)) or not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(f"peft.target_modules={show(targets)} must be a non-empty list of module names, e.g. "
                          "[q_proj, v_proj] (or one regular expression, or all-linear)")
    if cfg.peft.get("quantize_base") is not None:
        if cfg.model.init != "pretrained":
            raise ConfigError("peft=qlora quantizes the base model as its weights load: it needs model.init=pretrained "
                              "(model.name_or_path a hub id or a local save_pretrained directory)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("peft=qlora needs the bitsandbytes package: pip install 'tunelab[qlora]'")
        if shards_parameters(cfg.strategy):
            raise ConfigError(f"peft=qlora does not run under strategy={cfg.strategy.name}: use strategy=auto (one device) or "
                              "strategy=ddp (a sharding strategy splits each weight over the ranks, and bitsandbytes' "
                              "4-bit weights cannot be split: FSDP2's DTensor cannot wrap them, FSDP1 and ZeRO-3 flatten them)")
