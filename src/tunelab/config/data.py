"""The data group: where the rows come from, several sources mixed (data.sources), templates and packing. The rows
themselves are read once the tokenizer is there (tunelab.data.checks)."""

import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.config.fields import FIELDS, SOURCE_KEYS, is_kind
from tunelab.config.training import PREFERENCE_DATA
from tunelab.errors import ConfigError, show
from tunelab.tiny_task import TINY_SOURCES

INSTRUCTION_DATA = "tunelab.data.InstructionDataModule"
SOURCE_EXAMPLE = "[{name: a, path: a.jsonl, weight: 3}, {name: b, path: b.jsonl, weight: 1}]"


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    if data.get("val_size") is not None and data.val_size >= 1 and data.val_size != int(data.val_size):
        raise ConfigError(f"data.val_size={show(data.val_size)} is neither a fraction of the rows (< 1, e.g. 0.05) nor a "
                          f"number of rows (a whole number, e.g. {int(data.val_size)})")
    if data.source == "random_tokens":
        if data.num_examples < data.batch_size or data.val_size < 1:
            raise ConfigError("data=random_tokens needs num_examples >= batch_size and val_size >= 1 (rows held out)")
        return
    if OmegaConf.is_missing(data, "sources"):
        raise ConfigError(f"data.sources is not given: data=mix needs data.sources='{SOURCE_EXAMPLE}'")
    if data.get("sources") is not None:
        check_sources(data)
    elif data.source == "jsonl" and (OmegaConf.is_missing(data, "path") or not Path(str(data.path)).expanduser().is_file()):
        path = "???" if OmegaConf.is_missing(data, "path") else data.path
        raise ConfigError(f"data.path={path}: no such file; data=jsonl needs data.path=/path/to/rows.jsonl")
    elif data.source == "hub" and not data.path:
        raise ConfigError("data.source=hub needs data.path=<a Hugging Face dataset id>, e.g. tatsu-lab/alpaca")
    elif data.source in TINY_SOURCES and data.num_examples is None:
        raise ConfigError(f"data={data.source} generates data.num_examples rows: give a number, e.g. data.num_examples=4000")
    for key in ("prompt_template", "prompt_template_no_input"):
        if data.get(key) is not None:
            check_prompt_template(f"data.{key}", data[key])
    if data.packing and data.pack_tokens is not None and data.get("_target_") == PREFERENCE_DATA \
            and data.pack_tokens < 2 * data.max_length:
        raise ConfigError(f"data.pack_tokens={data.pack_tokens} cannot hold a pair: its chosen and rejected sides go "
                          f"in one packed row, each up to data.max_length={data.max_length} tokens; raise "
                          f"data.pack_tokens to at least {2 * data.max_length}, or set it to null")
    if data.packing and data.pack_tokens is not None and data.pack_tokens < data.max_length:
        raise ConfigError(f"data.pack_tokens={data.pack_tokens} is less than data.max_length={data.max_length}: "
                          "a packed row must hold the longest example; raise data.pack_tokens or set it to null")
    if data.get("streaming"):
        check_streaming(cfg)


def check_streaming(cfg: DictConfig) -> None:
    """data.streaming=true (tunelab.data.streaming): a stream has no length, so the step budget is the run's length."""
    if cfg.data.get("_target_") != INSTRUCTION_DATA:
        raise ConfigError(f"data.streaming=true streams instruction and chat rows (tunelab's InstructionDataModule), "
                          f"not {cfg.data.get('_target_')}: set data.streaming=false")
    if cfg.trainer.get("max_steps", -1) in (None, -1):
        raise ConfigError("data.streaming=true reads a stream with no length: set the run's length with "
                          "trainer.max_steps (e.g. trainer.max_steps=1000)")
    if isinstance(cfg.trainer.get("val_check_interval"), float):
        raise ConfigError(f"trainer.val_check_interval={show(cfg.trainer.val_check_interval)} is a fraction of an "
                          "epoch, and a stream has no epochs: give a number of steps (e.g. trainer.val_check_interval=100)")


def entry_source(entry) -> str:
    """Where a data.sources entry's rows come from: its `source`, else a local file where the path ends in .json,
    .jsonl or .parquet, else the Hugging Face Hub."""
    if entry.get("source"):
        return entry["source"]
    return "jsonl" if str(entry.get("path")).endswith((".json", ".jsonl", ".parquet")) else "hub"


def check_sources(data: DictConfig) -> None:
    """data.sources: datasets trained on together (tunelab.data.mixing), each a name, where its rows are and a weight;
    its other keys (split, format, num_examples) default to the data option's."""
    sources = data.sources
    if not isinstance(sources, ListConfig) or not sources:
        raise ConfigError(f"data.sources={show(sources)} must be a list of datasets, e.g. data.sources='{SOURCE_EXAMPLE}'")
    names = []
    for i, entry in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"{key}={show(entry)} must be a mapping with a name, a path and a weight, e.g. {SOURCE_EXAMPLE}")
        if unknown := sorted(set(entry) - set(SOURCE_KEYS)):
            raise ConfigError(f"{key} has a key {unknown[0]}: the keys of a source are {', '.join(SOURCE_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise ConfigError(f"{key}.name={show(name)}: give each source a name of letters, digits, _, . or -, e.g. "
                              "name: reverse (its metrics are val/loss/<name>)")
        if name in names:
            raise ConfigError(f"{key}.name={name} names two sources: give each its own name")
        names.append(name)
        weight = entry.get("weight", 1.0)
        if not is_kind(weight, float) or weight < 0:
            raise ConfigError(f"{key}.weight={show(weight)} must be a number >= 0: weights are the sources' shares of the "
                              "training rows (0: validated on, not trained on)")
        for field in ("source", "format", "num_examples", "split"):
            if field in entry and (problem := FIELDS[f"data.{field}"].problem(entry[field])):
                raise ConfigError(f"{key}.{field}={show(entry[field])} {problem}")
        source = entry_source(entry)
        if source == "random_tokens":
            raise ConfigError(f"{key}.source=random_tokens has no prompts or answers to mix: use jsonl, hub or tiny")
        path = entry.get("path")
        if source in ("jsonl", "hub") and not path:
            raise ConfigError(f"{key} ({name}) has no path: give a JSON-lines file or a Hugging Face dataset id")
        if source == "jsonl" and not Path(str(path)).expanduser().is_file():
            raise ConfigError(f"{key}.path={path}: no such file (source {name})")
        if source.startswith("tiny") and entry.get("num_examples", data.get("num_examples")) is None:
            raise ConfigError(f"{key} ({name}) generates num_examples rows: give a number, e.g. num_examples: 1000")
    if not any(entry.get("weight", 1.0) for entry in sources):
        raise ConfigError("data.sources: every weight is 0, so nothing is trained on: give at least one source a weight > 0")


def check_prompt_template(key: str, template: str) -> None:
    try:
        template.format(instruction="", input="")
    except KeyError as error:
        raise ConfigError(f"{key}={show(template)} has a field {{{error.args[0]}}}: the only fields are {{instruction}} "
                          "and {input} (write {{ and }} for a literal brace)") from error
    except (IndexError, ValueError) as error:
        raise ConfigError(f"{key}={show(template)} is not a format string ({error}): the only fields are "
                          "{instruction} and {input} (write {{ and }} for a literal brace)") from error
