"""Opens what the config points at (the tokenizer, the data rows, the model's architecture) and checks them against
each other before the MLflow run starts and before any weights load: a bad data file, a model type transformers does
not know or a LoRA target the model does not have ends with one ConfigError line saying which file and row, or which
names, instead of a traceback mid-run.

Kept apart from tunelab.config, which reads the config alone: these checks need the tokenizer, transformers and peft,
and what they open (a Hub id, a data file) may be reachable only on the machine that runs the job.
"""

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.config import ConfigError, one_line, show
from tunelab.tiny_task import TINY_SOURCES

FORMAT_FIELDS = {
    "alpaca": "instruction and output strings (input optional)",
    "chat": "messages, a list of {role, content} strings",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMAT_COLUMNS = {"alpaca": {"instruction", "output"}, "chat": {"messages"}}


def load_tokenizer(model_cfg: DictConfig):
    from tunelab.model import build_tokenizer

    try:
        return build_tokenizer(model_cfg)
    except (OSError, ValueError) as error:
        key = "tokenizer" if model_cfg.tokenizer else "name_or_path"
        raise ConfigError(f"model.{key}={model_cfg[key]}: cannot load its tokenizer ({one_line(error)}); give a hub id "
                          "this machine can reach, a local save_pretrained directory, or model.tokenizer=char") from error


def check_inputs(cfg: DictConfig, tokenizer) -> None:
    check_data_rows(cfg.data, tokenizer)
    check_architecture(cfg, tokenizer)
    from tunelab.grpo_checks import check_grpo_inputs  # module=grpo: prompts within the context, rewards' answers

    check_grpo_inputs(cfg, tokenizer)


# ---- data ----------------------------------------------------------------------------------------------------------

def check_data_rows(data: DictConfig, tokenizer, key: str = "data") -> None:
    from tunelab.config import PREFERENCE_DATA

    if data.get("_target_") == PREFERENCE_DATA:  # prompt, chosen, rejected (module=dpo)
        from tunelab.data.preference import check_pair_rows

        return check_pair_rows(data, tokenizer)
    if data.get("sources"):
        for index, source in enumerate(source_options(data)):
            check_data_rows(source, tokenizer, f"data.sources[{index}]")
        return
    if data.source == "hub":
        if check_hub_dataset(data) == "chat" or data.format == "chat":
            check_chat_template(tokenizer, f"data.path={data.path}")
    elif data.source == "jsonl":
        check_rows_file(Path(data.path).expanduser(), f"{key}.path={data.path}", data, tokenizer)
    elif data.source in TINY_SOURCES:
        from tunelab.data import tiny_task_file

        path = tiny_task_file(data.cache_dir, data.num_examples, data.seed, data.source)
        check_rows_file(path, f"data={data.source}", data, tokenizer)


def source_options(data: DictConfig) -> list[DictConfig]:
    """Each of data.sources as a data option of its own, checked as one; a source need only hold out its validation
    rows and give one training row, since the mix's batches draw from all of them."""
    from tunelab.data.mixing import mix_sources

    sources = mix_sources(data.sources, source=data.source, path=data.path, split=data.split, format=data.format,
                          num_examples=data.num_examples)
    return [OmegaConf.merge(data, {"sources": None, "source": s.source, "path": s.path, "split": s.split,
                                   "format": s.format, "num_examples": s.num_examples, "batch_size": 1, "packing": False})
            for s in sources]


def check_hub_dataset(data: DictConfig) -> str | None:
    """Resolves the dataset on the Hub (or in the cache) without downloading its rows; its format, where its columns
    are known."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(data.path, cache_dir=str(Path(data.cache_dir) / "datasets"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.path={data.path}: cannot load this dataset from the Hugging Face Hub ({one_line(error)}); "
                          "check the id and the network, set HF_DATASETS_OFFLINE=1 to use a cached copy, "
                          "or give a local file with data=jsonl data.path=...") from error
    splits = builder.info.splits
    if splits and data.split.split("[")[0] not in splits:
        raise ConfigError(f"data.split={data.split} is not a split of data.path={data.path}: one of {', '.join(splits)}")
    if builder.info.features is not None:
        columns = set(builder.info.features)
        fmt = resolve_format(data.format, columns, f"data.path={data.path}")
        if not FORMAT_COLUMNS[fmt] <= columns:
            raise ConfigError(f"data.path={data.path} has columns {', '.join(sorted(columns))}, and data.format={fmt} "
                              f"rows need {FORMAT_FIELDS[fmt]}")
        return fmt
    return None


def check_rows_file(path: Path, label: str, data: DictConfig, tokenizer) -> None:
    """Every row well-formed for the data format, and enough rows with an answer within data.max_length to hold out
    data.val_size and train on a batch. Tokenizes only until there are enough, so a good file costs two JSON scans."""
    from tunelab.data.rows import RowTokenizer, is_trained

    fmt = resolve_format(data.format, file_columns(path, label), label)
    if fmt == "chat":
        check_chat_template(tokenizer, label)
    tokenize = RowTokenizer(fmt, (data.prompt_template, data.prompt_template_no_input), tokenizer, data.max_length,
                            data.get("train_on", "all_assistant"), data.get("truncation", "cut_turns"))
    # A template that rewrites earlier turns shows only in a row with two assistant turns: look on until one is seen.
    multi_turn_seen = fmt != "chat" or data.get("train_on", "all_assistant") == "last_assistant"
    usable, answered, rows = 0, 0, 0
    for where, row in read_rows(path, label):
        if rows == data.num_examples:
            break
        rows += 1
        if problem := row_problem(row, fmt):
            raise ConfigError(f"{label} {where} {problem}; {format_hint(row, fmt, data.format)}")
        multi_turn = fmt == "chat" and sum(message["role"] == "assistant" for message in row["messages"]) > 1
        if not trains_a_batch(usable, data) or (multi_turn and not multi_turn_seen):
            example = tokenized_row(tokenize, row, f"{label} {where}")
            usable += is_trained(example)
            answered += example["fate"] != "untrained"
            multi_turn_seen |= multi_turn
    if answered == 0:
        raise ConfigError(f"{label}: no row has an assistant message, so there is nothing to train on")
    if usable == 0:
        raise ConfigError(f"{label}: no row has an answer token within data.max_length={data.max_length} (each "
                          "answer starts past it): raise data.max_length")
    if not trains_a_batch(usable, data):
        train, val = split_sizes(usable, data.val_size)
        raise ConfigError(f"{label} has {usable} rows with an answer within data.max_length: {val} held out "
                          f"(data.val_size={data.val_size}) leave {max(train, 0)} to train on, fewer than one batch "
                          f"(data.batch_size={data.batch_size}); give more rows, or lower data.batch_size or data.val_size")


def read_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a JSON-lines file (blank lines skipped) or of a file holding one JSON array: the
    two layouts datasets' json loader reads."""
    try:
        with path.open(encoding="utf-8") as file:
            if file.read(4096).lstrip().startswith("["):
                file.seek(0)
                rows = parse_json(file.read(), label, "")
                yield from ((f"row {number}", row) for number, row in enumerate(rows, 1))
                return
            file.seek(0)
            for number, line in enumerate(file, 1):
                if line.strip():
                    yield f"line {number}", parse_json(line, label, f"line {number}")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{label} is not UTF-8 text ({error.reason}): give a JSON-lines file, one object per line") from error


def parse_json(text: str, label: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = where or f"line {error.lineno}"
        raise ConfigError(f"{label} {where}: not valid JSON ({error.msg} at column {error.colno}); "
                          "each line must hold one JSON object") from None


def file_columns(path: Path, label: str) -> set[str]:
    """The fields of all rows together, as datasets makes its columns."""
    columns, count = set(), 0
    for where, row in read_rows(path, label):
        if not isinstance(row, dict):
            raise ConfigError(f"{label} {where} is {snippet(row)}, not a JSON object: each line must hold one row, "
                              f"with {FORMAT_FIELDS['alpaca']} or {FORMAT_FIELDS['chat']}")
        columns |= row.keys()
        count += 1
    if count == 0:
        raise ConfigError(f"{label} holds no rows: write one JSON object per line, with {FORMAT_FIELDS['alpaca']} "
                          f"or {FORMAT_FIELDS['chat']}")
    return columns


def resolve_format(fmt: str, columns: set[str], label: str) -> str:
    if fmt != "auto":
        return fmt
    from tunelab.data import detect_format

    try:
        return detect_format(sorted(columns))
    except ValueError as error:
        raise ConfigError(f"{label}: {error}") from None


def row_problem(row: dict, fmt: str) -> str | None:
    """What keeps a row from being a row of the format, or None."""
    if fmt == "alpaca":
        for field in ("instruction", "output", "input"):
            value = row.get(field)
            if value is None and field != "input":
                return f"has no {field}"
            if value is not None and not isinstance(value, str):
                return f"has {field}={snippet(value)}, not a string"
        return None
    messages = row.get("messages")
    if messages is None:
        return "has no messages"
    if not isinstance(messages, list) or not messages:
        return f"has messages={snippet(messages)}, not a list of messages"
    for number, message in enumerate(messages, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            return f"has message {number} {snippet(message)}, which is not a role and a content string"
        if message["role"] not in CHAT_ROLES:
            return (f"has message {number} with role {snippet(message['role'])}: a role is one of "
                    f"{', '.join(CHAT_ROLES)} (a chat template renders any other silently as text)")
    return None


def format_hint(row: dict, fmt: str, configured: str) -> str:
    other = "chat" if fmt == "alpaca" else "alpaca"
    if configured != "auto" and row_problem(row, other) is None:
        return f"it is {'an' if other == 'alpaca' else 'a'} {other} row: set data.format={other} (or auto)"
    return f"data.format={fmt} rows need {FORMAT_FIELDS[fmt]}"


def check_chat_template(tokenizer, label: str) -> None:
    if not tokenizer.chat_template:
        raise ConfigError(f"{label} holds chat rows, and the tokenizer has no chat template: give one with "
                          "model.chat_template= (a Jinja template, or the path of a file holding one), use a chat "
                          "(instruct) model's tokenizer, or alpaca rows")


def tokenized_row(tokenize, row: dict, where: str) -> dict:
    from jinja2 import TemplateError

    try:
        return tokenize(row)
    except ConfigError as error:  # tunelab.data.chat.TemplateRewritesTurns
        raise ConfigError(f"{where}: {error}") from error
    except (TemplateError, ValueError) as error:  # a chat template may refuse a conversation (raise_exception)
        raise ConfigError(f"{where}: the chat template refuses this row: {one_line(error)}") from error


def split_sizes(rows: int, val_size: float) -> tuple[int, int]:
    """(train, val) rows as datasets' train_test_split makes them for data.val_size, a fraction (< 1) or a count."""
    val = int(val_size) if val_size >= 1 else math.ceil(val_size * rows)
    return rows - val, val


def trains_a_batch(rows: int, data: DictConfig) -> bool:
    train, val = split_sizes(rows, data.val_size)
    return val >= 1 and train >= (1 if data.packing else data.batch_size)


def snippet(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- model and adapters --------------------------------------------------------------------------------------------

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
