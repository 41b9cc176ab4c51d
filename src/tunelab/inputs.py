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

from tunelab.config.grpo import is_grpo
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
    check_grpo_inputs(cfg, tokenizer)  # module=grpo: prompts within the context, rewards' answers


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


def check_grpo_inputs(cfg: DictConfig, tokenizer) -> None:
    """The rows' prompts leave room for max_new_tokens in the model's context, and every reward gives one number per
    completion on the first row (its own answer, and an empty completion, as the group)."""
    if not is_grpo(cfg) or cfg.data.get("sources"):
        return
    from tunelab.data import load_rows
    from tunelab.data.formats import detect_format
    from tunelab.data.rows import RowTokenizer
    from tunelab.modules.grpo import build_rewards, prompt_and_answer, score

    data, module = cfg.data, cfg.module
    rows = load_rows(data.source, data.path, data.split, data.num_examples, data.cache_dir, data.seed)
    fmt = detect_format(rows.column_names) if data.format == "auto" else data.format
    tokenize = RowTokenizer(fmt, (data.prompt_template, data.prompt_template_no_input), tokenizer, data.max_length,
                            data.get("train_on", "all_assistant"), data.get("truncation", "cut_turns"))
    context = getattr(model_config(cfg.model, tokenizer)[0], "max_position_embeddings", None)
    first = None
    for number, row in enumerate(rows, start=1):
        encoded = tokenize(row)
        if encoded["fate"] not in ("kept", "cut"):
            continue
        prompt, answer = prompt_and_answer(encoded["input_ids"], encoded["labels"])
        first = first or (prompt, answer)
        if context is not None and len(prompt) + module.max_new_tokens > context:
            raise ConfigError(f"data row {number}: its prompt is {len(prompt)} tokens, and with module.max_new_tokens="
                              f"{module.max_new_tokens} it runs past the model's context of {context} tokens: lower "
                              "module.max_new_tokens or data.max_length")
    if first is None:
        return  # check_data_rows has said why no row trains
    group = module.num_generations
    prompt, answer = (tokenizer.decode(ids, skip_special_tokens=True) for ids in first)
    from tunelab.rewards import RewardError

    try:
        score(build_rewards(module.rewards), [prompt] * group, [answer] + [""] * (group - 1), {"answer": [answer] * group})
    except RewardError as error:
        raise ConfigError(f"module.rewards: on data row 1, {error}") from None
