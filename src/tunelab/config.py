"""Checks the whole composed config once, up front, before anything heavy is imported or loaded.

Every problem is reported as one ConfigError line that says what is wrong and how to fix it. First each key is held
to the type and range of FIELDS, so the checks after it, which relate keys to each other and to the hardware, can
trust what they read.
"""

import importlib.util
import json
import logging
import operator
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tunelab.precision import FLOAT8_LAYERS, FLOAT8_RECIPES, float8_gpu_problem, precision_warnings
from tunelab.kernel_choice import COMPILES, FUSED_OPS, LOSSES, liger_available, resolve_kernels
from tunelab.strategy import (AUTO_WRAP_CHOICES, gpu_count, is_fsdp2, is_known_strategy, runs_on_gpu, shards_parameters,
                              strategy_devices)
from tunelab.tiny_task import TINY_SOURCES

log = logging.getLogger(__name__)

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
PROFILERS = (None, "simple", "advanced", "pytorch")
GENERATED_EXACT_MATCH = "val/generated_exact_match"  # logged by the samples callback (tunelab.samples)
DPO_MODULE, PREFERENCE_DATA = "tunelab.dpo.DPOModule", "tunelab.data.preference.PreferenceDataModule"
DPO_METRICS = tuple(f"val/{name}" for name in ("rewards/accuracy", "rewards/margin", "rewards/chosen",
                                               "rewards/rejected", "logps/chosen", "logps/rejected"))  # module=dpo's
GRPO_METRICS = ("val/reward",)  # module=grpo's: the weighted reward of greedy answers to the validation prompts
VALIDATION_METRICS = ("val/loss", "val/exact_match", GENERATED_EXACT_MATCH, *DPO_METRICS, *GRPO_METRICS)


class ConfigError(ValueError):
    pass


def one_line(error: BaseException, limit: int | None = 300, named: bool = False) -> str:
    """An upstream error's message for the end of a ConfigError line: on one line, cut after `limit` characters, led by
    the exception's type where `named` (an import failure's type says as much as its message)."""
    text = " ".join(str(error).split())
    if named:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = text or type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def show(value: Any) -> str:
    """A config value as a user would type it on the command line, on one line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return value if value.isprintable() else json.dumps(value)
    return json.dumps(value)


def is_kind(value: Any, kind: type) -> bool:
    """An int is a number too; a bool is neither (Python counts True as 1)."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is dict:
        return isinstance(value, (dict, DictConfig))
    return isinstance(value, kind)


KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
KIND_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings", dict: "mappings"}
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class Rule:
    """A value of `kind` within `bounds` (each like ">= 1" or "< 1"), or null where `null`."""

    def __init__(self, kind: type, *bounds: str, null: bool = False):
        self.kind, self.bounds, self.null = kind, bounds, null

    def __str__(self) -> str:
        return " ".join([KIND_NAMES[self.kind], " and ".join(self.bounds)]).strip() + (" or null" if self.null else "")

    def problem(self, value: Any) -> str | None:
        if value is None and self.null:
            return None
        if not is_kind(value, self.kind):
            return f"must be {self}"
        for bound in self.bounds:
            comparison, limit = bound.split()
            if not COMPARISONS[comparison](value, float(limit)):
                return f"must be {' and '.join(self.bounds)}"
        return None


class OneOf:
    def __init__(self, *choices: Any):
        self.choices = choices

    def problem(self, value: Any) -> str | None:
        # `value in choices` would take 1 for True and 1.0 for 1: compare the types too.
        if any(value == choice and type(value) is type(choice) for choice in self.choices):
            return None
        return f"is not one of: {', '.join(show(choice) for choice in self.choices)}"


class ListOf:
    def __init__(self, item: Rule, length: int):
        self.item, self.length = item, length

    def problem(self, value: Any) -> str | None:
        if isinstance(value, ListConfig) and len(value) == self.length and not any(self.item.problem(v) for v in value):
            return None
        return f"must be a list of {self.length} {KIND_PLURALS[self.item.kind]} {' and '.join(self.item.bounds)}".rstrip()


class AnyOf:
    """A value that one of `rules` accepts."""

    def __init__(self, *rules: Rule):
        self.rules = rules

    def problem(self, value: Any) -> str | None:
        if any(rule.problem(value) is None for rule in self.rules):
            return None
        return f"must be {' or '.join(str(rule) for rule in self.rules)}"


# What each key may hold. A key the chosen option lacks, or under a group or callback set to null, is not checked.
FIELDS: dict[str, Rule | OneOf | ListOf | AnyOf] = {
    "seed": Rule(int, ">= 0"),
    "ckpt_path": Rule(str, null=True),
    "objective.metric": Rule(str),  # one of VALIDATION_METRICS, or one of a source's (check_objective)
    "objective.mode": OneOf("min", "max"),
    "export": AnyOf(Rule(bool), Rule(dict)),  # export=false stands for export.enabled=false
    "export.enabled": Rule(bool),
    "export.merge": Rule(bool),
    "system_metrics": OneOf("auto", True, False),
    "validate_at_start": OneOf("auto", True, False),

    "model.name_or_path": Rule(str, null=True),
    "model.init": OneOf("pretrained", "random"),
    "model.tokenizer": Rule(str, null=True),
    "model.chat_template": Rule(str, null=True),
    "model.dtype": OneOf(None, "float32", "bfloat16", "float16"),
    "model.attn_implementation": Rule(str),
    "model.gradient_checkpointing": Rule(bool),
    "model.zero_embeddings": OneOf("fill", "keep"),
    "model.trust_remote_code": Rule(bool),
    "model.config": Rule(dict, null=True),
    "model.recommended_lr.full": Rule(float, "> 0"),
    "model.recommended_lr.adapter": Rule(float, "> 0"),

    "data.source": OneOf(*TINY_SOURCES, "tiny_pairs", "hub", "jsonl", "random_tokens"),
    "data.path": Rule(str, null=True),
    "data.split": Rule(str),
    "data.num_examples": Rule(int, ">= 1", null=True),
    "data.format": OneOf("alpaca", "chat", "auto"),
    "data.train_on": OneOf("all_assistant", "last_assistant"),
    "data.truncation": OneOf("cut_turns", "drop"),
    "data.prompt_template": Rule(str),
    "data.prompt_template_no_input": Rule(str),
    "data.max_length": Rule(int, ">= 2"),
    "data.batch_size": Rule(int, ">= 1"),
    "data.val_size": Rule(float, "> 0"),  # a fraction (< 1) or a number of examples (>= 1)
    "data.max_val_examples": Rule(int, ">= 1", null=True),
    "data.num_workers": Rule(int, ">= 0"),
    "data.seed": Rule(int, ">= 0"),
    "data.cache_dir": Rule(str),
    "data.packing": Rule(bool),
    "data.pack_tokens": Rule(int, ">= 2", null=True),

    "peft.r": Rule(int, ">= 1"),
    "peft.lora_alpha": Rule(float, "> 0"),
    "peft.lora_dropout": Rule(float, ">= 0", "< 1"),
    "peft.bias": OneOf("none", "all", "lora_only"),
    "peft.quantize_base": Rule(dict, null=True),

    "optim.lr": Rule(float, "> 0"),
    "optim.weight_decay": Rule(float, ">= 0"),
    "optim.betas": ListOf(Rule(float, ">= 0", "< 1"), length=2),
    "optim.eps": Rule(float, "> 0"),
    "optim.fused": Rule(bool, null=True),
    "optim.warmup_steps": Rule(int, ">= 0", null=True),
    "optim.warmup_ratio": Rule(float, ">= 0", "<= 1", null=True),
    "optim.min_lr_ratio": Rule(float, ">= 0", "<= 1"),
    "optim.total_steps": Rule(int, ">= 1", null=True),

    "strategy.name": Rule(str),
    "strategy.devices": Rule(int, ">= 1"),
    "strategy.accelerator": Rule(str),
    "strategy.sharding_strategy": OneOf("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD"),
    "strategy.auto_wrap": OneOf(*AUTO_WRAP_CHOICES),
    "strategy.activation_checkpointing": Rule(bool),
    "strategy.cpu_offload": Rule(bool),
    "strategy.state_dict_type": OneOf("full", "sharded"),
    "strategy.param_dtype": OneOf("auto", None, "float32", "bfloat16"),
    "strategy.reduce_dtype": OneOf("auto", None, "float32", "bfloat16"),
    "strategy.find_unused_parameters": Rule(bool),
    "strategy.stage": OneOf(0, 1, 2, 3),
    "strategy.offload_optimizer": Rule(bool),
    "strategy.offload_parameters": Rule(bool),

    "precision.value": OneOf(*PRECISIONS),
    "precision.model_dtype": OneOf("float32", "bfloat16", "float16"),
    "precision.float8": Rule(dict, null=True),
    "precision.float8.recipe": OneOf(*FLOAT8_RECIPES),
    "precision.float8.layers": OneOf(*FLOAT8_LAYERS),
    "precision.float8.emulate": Rule(bool),

    "kernels.loss_chunk_size": Rule(int, ">= 1"),
    "kernels.compile_mode": OneOf(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),

    "callbacks.model_checkpoint.save_top_k": Rule(int, ">= -1"),
    "callbacks.early_stopping.patience": Rule(int, ">= 0"),
    "callbacks.grad_norm.norm_type": Rule(float, "> 0"),
    "callbacks.divergence.action": OneOf("stop", "skip"),
    "callbacks.lr_monitor.logging_interval": OneOf(None, "step", "epoch"),
    "callbacks.samples.count": Rule(int, ">= 1"),
    "callbacks.samples.max_new_tokens": Rule(int, ">= 1"),

    "trainer.accelerator": Rule(str),
    "trainer.num_nodes": Rule(int, ">= 1"),
    "trainer.max_steps": Rule(int, ">= -1"),  # -1: no limit
    "trainer.max_epochs": Rule(int, ">= -1", null=True),
    "trainer.val_check_interval": Rule(float, "> 0", null=True),
    "trainer.check_val_every_n_epoch": Rule(int, ">= 1", null=True),
    "trainer.limit_val_batches": Rule(float, ">= 0", null=True),
    "trainer.accumulate_grad_batches": Rule(int, ">= 1"),
    "trainer.gradient_clip_val": Rule(float, ">= 0", null=True),
    "trainer.log_every_n_steps": Rule(int, ">= 1"),
    "trainer.num_sanity_val_steps": Rule(int, ">= -1"),
    "trainer.profiler": OneOf(*PROFILERS),
    "trainer.deterministic": OneOf(True, False, "warn"),
    "trainer.enable_progress_bar": Rule(bool),
    "trainer.default_root_dir": Rule(str),
}
ABSENT = object()


def validate_config(cfg: DictConfig) -> None:
    for check in (check_resolves, check_fields, check_model, check_data, check_peft, check_kernels, check_optim,
                  check_trainer, check_fsdp_adapters, check_placement, check_float8, check_run, check_preference, check_grpo, check_objective,
                  check_evaluation,
                  check_tracking_server, check_targets):
        check(cfg)
    for warning in precision_warnings(cfg.precision, cfg.model):
        log.warning(warning)


def check_grpo(cfg: DictConfig) -> None:
    from tunelab.grpo_checks import check_grpo_config  # module=grpo's keys and reward functions

    check_grpo_config(cfg)


def check_targets(cfg: DictConfig) -> None:
    """The classes that callbacks, data, logger and module name (tunelab.targets). Importing them imports Lightning
    too, so this check runs after every one that reads the config alone."""
    from tunelab.targets import check_group_targets

    check_group_targets(cfg)


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves (an unset environment variable, a key that is not there), so no later read of a
    value raises."""
    try:
        for key in cfg:
            if key == "hydra":
                continue
            value = cfg[key]  # a scalar resolves as it is read
            if isinstance(value, DictConfig):
                OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{error.full_key} does not resolve: {str(error.msg).splitlines()[0]}") from error


def check_fields(cfg: DictConfig) -> None:
    for key, rule in FIELDS.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and (problem := rule.problem(value)):
            raise ConfigError(f"{key}={show(value)} {problem}")


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
    if data.packing and data.pack_tokens is not None and data.pack_tokens < data.max_length:
        raise ConfigError(f"data.pack_tokens={data.pack_tokens} is less than data.max_length={data.max_length}: "
                          "a packed row must hold the longest example; raise data.pack_tokens or set it to null")


def chat_template_text(value: str) -> str:
    """model.chat_template's Jinja: the value itself where it holds Jinja tags, else the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={value}: no such file, and not a Jinja template either (no {{{{ or "
                          "{%): give the template itself or the path of a file holding it")
    return path.read_text(encoding="utf-8")


SOURCE_KEYS = ("name", "source", "path", "split", "format", "weight", "num_examples")
SOURCE_EXAMPLE = "[{name: a, path: a.jsonl, weight: 3}, {name: b, path: b.jsonl, weight: 1}]"


def entry_source(entry) -> str:
    """Where a data.sources entry's rows come from: its `source`, else a local file where the path ends in .json or
    .jsonl, else the Hugging Face Hub."""
    if entry.get("source"):
        return entry["source"]
    return "jsonl" if str(entry.get("path")).endswith((".json", ".jsonl")) else "hub"


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


def check_kernels(cfg: DictConfig) -> None:
    kernels = cfg.kernels
    for key, choices in (("loss", LOSSES), ("compile", COMPILES), ("fused_ops", FUSED_OPS)):
        if kernels[key] not in choices:
            raise ConfigError(f"kernels.{key}={show(kernels[key])} is not one of: {', '.join(choices)}")
    on_gpu = runs_on_gpu(cfg.strategy, cfg.trainer)
    chosen = resolve_kernels(cfg)
    if chosen["loss"] != "plain" and cfg.peft and "lm_head" in (cfg.peft.get("target_modules") or []):
        raise ConfigError("peft.target_modules has lm_head, which the fused loss reads as a plain weight: "
                          "use kernels.loss=plain, or drop lm_head from the targets")
    for key in ("loss", "fused_ops"):
        if chosen[key] != "liger":
            continue
        if not liger_available():
            raise ConfigError(f"kernels.{key}=liger needs the liger-kernel package: pip install liger-kernel")
        if not on_gpu:
            raise ConfigError(f"kernels.{key}=liger runs on CUDA GPUs only (Triton kernels): on CPU use "
                              f"kernels.{key}={'chunked' if key == 'loss' else 'none'}")


def check_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    if optim.warmup_steps is not None and optim.warmup_ratio:
        raise ConfigError("give optim.warmup_steps or optim.warmup_ratio, not both (set the other to null)")
    if optim.warmup_steps is None and optim.warmup_ratio is None:
        raise ConfigError("optim.warmup_steps and optim.warmup_ratio are both null: give one (0 for no warmup)")


def check_trainer(cfg: DictConfig) -> None:
    """Lightning reads a float in these keys as a fraction of an epoch and an integer as a number of batches."""
    for key in ("val_check_interval", "limit_val_batches"):
        value = cfg.trainer.get(key)
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"trainer.{key}={show(value)}: a float is a fraction of an epoch (at most 1.0); "
                              f"give a number of batches as an integer, e.g. trainer.{key}={int(value)}")
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, float) and cfg.trainer.get("check_val_every_n_epoch") is None:
        raise ConfigError(f"trainer.val_check_interval={show(interval)} is a fraction of an epoch, which Lightning counts "
                          "only with trainer.check_val_every_n_epoch set: give a number of steps as an integer (e.g. "
                          "trainer.val_check_interval=100), or add trainer.check_val_every_n_epoch=1")


def check_placement(cfg: DictConfig) -> None:
    """Strategy, devices and precision against the hardware that is actually here."""
    strategy, trainer = cfg.strategy, cfg.trainer
    if not is_known_strategy(strategy):
        raise ConfigError(f"strategy.name={strategy.name} is not a Lightning strategy: use an option of conf/strategy or give a _target_")
    devices = strategy_devices(strategy, trainer)
    check_devices(devices)
    gpus = gpu_count()
    uses_gpu = runs_on_gpu(strategy, trainer)
    check_sharding(strategy, uses_gpu)
    check_nodes(trainer.num_nodes, devices)
    if uses_gpu:
        wanted = gpus if devices in ("auto", -1) else (len(devices) if not isinstance(devices, int) else devices)
        if wanted > gpus or gpus == 0:
            raise ConfigError(f"strategy {strategy.name} needs {max(wanted, 1)} GPUs, found {gpus}")
    elif cfg.precision.value == "16-mixed":
        raise ConfigError("precision 16_mixed needs a GPU (fp16 autocast); on CPU use precision=bf16_mixed or 32_true")


def check_float8(cfg: DictConfig) -> None:
    """precision=fp8 against the rest of the run and the GPU that is here."""
    if not cfg.precision.get("float8"):
        return
    name = cfg.precision.get("name", "fp8")
    if cfg.precision.value != "bf16-true":
        raise ConfigError(f"precision={name} trains bfloat16 weights with float8 matmuls: it needs "
                          f"precision.value=bf16-true, not {cfg.precision.value}")
    if cfg.peft and cfg.peft.get("quantize_base") is not None:
        raise ConfigError(f"precision={name} does not combine with peft=qlora: the 4-bit base's matmuls are "
                          "bitsandbytes kernels, not float8 ones; use peft=lora (float8 base, bf16 adapters) or precision=bf16_true")
    if shards_parameters(cfg.strategy) and not is_fsdp2(cfg.strategy):
        raise ConfigError(f"precision={name} does not run under strategy={cfg.strategy.name} (its flat parameters hide "
                          "the float8 layers' weights): use strategy=fsdp (FSDP2), strategy=auto or strategy=ddp")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"precision={name} needs the torchao package: pip install 'tunelab[gpu]'")
    if cfg.precision.float8.emulate:
        return
    if not runs_on_gpu(cfg.strategy, cfg.trainer):
        raise ConfigError(f"precision={name} needs an NVIDIA GPU with float8 matmuls (compute capability 8.9+: H100, "
                          "H200, L4); this run is on the CPU: use precision=bf16_true, or precision.float8.emulate=true "
                          "to check float8 numerics slowly")
    if problem := float8_gpu_problem():
        raise ConfigError(f"precision={name}: {problem}; use precision=bf16_true")


def check_devices(devices: Any) -> None:
    """What Lightning takes: auto, a count (-1: all), or the indices of the devices to use."""
    count = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    indices = isinstance(devices, ListConfig) and len(devices) > 0 and all(is_kind(d, int) and d >= 0 for d in devices)
    if not (devices == "auto" or count or indices):
        raise ConfigError(f"trainer.devices={show(devices)} must be auto, a number of devices (-1 for all of them) "
                          "or a list of device indices, e.g. [0, 1]")


def check_sharding(strategy: DictConfig, uses_gpu: bool) -> None:
    target = str(strategy.get("_target_", ""))
    if target.endswith(("FSDPStrategy", "DeepSpeedStrategy")) and not uses_gpu:
        raise ConfigError(f"strategy {strategy.name} needs GPUs (Lightning's FSDP and DeepSpeed refuse CPU); on CPU use strategy=ddp trainer.accelerator=cpu")
    if is_fsdp2(strategy) and strategy.get("cpu_offload") and not uses_gpu:
        raise ConfigError(f"strategy.cpu_offload=true keeps {strategy.name}'s GPU state in CPU memory; this run is on the "
                          "CPU already: set strategy.cpu_offload=false")
    if target.endswith("DeepSpeedStrategy") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy {strategy.name} needs the deepspeed package: pip install 'tunelab[deepspeed]'")


def check_fsdp_adapters(cfg: DictConfig) -> None:
    """A LoRA model's FSDP units hold flat parameters (tunelab.strategy), and Lightning can re-key a full optimizer
    state only by original parameters: it stops at the first checkpoint (seen on 2 H100s)."""
    if cfg.peft and str(cfg.strategy.get("_target_", "")).endswith("FSDPStrategy") and cfg.strategy.get("state_dict_type") == "full":
        raise ConfigError(f"peft=lora under strategy={cfg.strategy.name} writes sharded checkpoints only: set strategy.state_dict_type=sharded "
                          "(the export at the end of the run is still whole)")


def check_nodes(num_nodes: int, devices) -> None:
    """Several nodes need every process started from outside (torchrun on each node, or SLURM); under torchrun the
    process counts it was given must be the ones the config asks for."""
    torchrun = "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ
    if num_nodes > 1 and not torchrun and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} needs a multi-node launch: torchrun --nnodes={num_nodes} on every node, "
            "or hydra/launcher=submitit_slurm (docs/scale-out.md)"
        )
    if torchrun and isinstance(devices, int):
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        if (local, world) != (devices, devices * num_nodes):
            raise ConfigError(
                f"torchrun started {local} processes per node, {world} in all, but the config asks for "
                f"devices={devices} x num_nodes={num_nodes}: make --nproc-per-node and --nnodes match"
            )


def check_run(cfg: DictConfig) -> None:
    if cfg.ckpt_path not in (None, "last"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.exists():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint (or use ckpt_path=last)")
        if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes zip archives; sharded ones are dirs
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a PyTorch checkpoint (truncated or another kind of file)")


def check_objective(cfg: DictConfig) -> None:
    """ModelCheckpoint and EarlyStopping stop the run at the first validation that does not log the objective."""
    if cfg.objective.metric.startswith(EVAL_PREFIX):
        return  # a benchmark's score: check_evaluation holds it to the eval option
    names = [entry.name for entry in cfg.data.get("sources") or []]
    per_source = tuple(f"{metric}/{name}" for name in names for metric in VALIDATION_METRICS[:2])
    if cfg.objective.metric not in VALIDATION_METRICS + per_source:
        raise ConfigError(f"objective.metric={show(cfg.objective.metric)} is not one of: "
                          f"{', '.join(VALIDATION_METRICS + per_source)}")
    if cfg.objective.metric != GENERATED_EXACT_MATCH:
        return
    if OmegaConf.select(cfg, "callbacks.samples") is None:
        raise ConfigError(f"objective.metric={GENERATED_EXACT_MATCH} is logged by the samples callback, which is off: "
                          "drop callbacks.samples=null (or callbacks=none), or pick another objective.metric")
    if cfg.data.get("source") == "random_tokens":
        raise ConfigError(f"objective.metric={GENERATED_EXACT_MATCH} needs data with prompts and answers; "
                          "data=random_tokens has none")


DPO_FIELDS = {"beta": Rule(float, "> 0"), "loss_type": OneOf("sigmoid", "ipo", "robust"),
              "label_smoothing": Rule(float, ">= 0", "< 0.5"), "reference": OneOf("auto", "adapter", "copy", "precomputed"),
              "sft_weight": Rule(float, ">= 0")}


def is_dpo(cfg: DictConfig) -> bool:
    return bool(cfg.get("module")) and cfg.module.get("_target_") == DPO_MODULE


def check_preference(cfg: DictConfig) -> None:
    """module=dpo (tunelab.dpo) and preference pairs (tunelab.data.preference) go together; the DPO keys."""
    pairs = cfg.data.get("_target_") == PREFERENCE_DATA
    if pairs and not is_dpo(cfg):
        raise ConfigError(f"data={cfg.data.source} holds preference pairs (prompt, chosen, rejected), which "
                          f"module._target_={cfg.module.get('_target_')} does not train on: use module=dpo")
    if not is_dpo(cfg):
        if cfg.objective.metric in DPO_METRICS:
            raise ConfigError(f"objective.metric={cfg.objective.metric} is logged by module=dpo only: pick another "
                              "objective.metric, or use module=dpo")
        return
    if not pairs:
        raise ConfigError("module=dpo trains on preference pairs: use data=tiny_pairs, or data=pairs "
                          "data.path=<a JSON-lines file of prompt, chosen, rejected>")
    module, data = cfg.module, cfg.data
    for key, rule in DPO_FIELDS.items():
        if key in module and (problem := rule.problem(module[key])):
            raise ConfigError(f"module.{key}={show(module[key])} {problem}")
    if module.get("label_smoothing") and module.get("loss_type") != "robust":
        raise ConfigError(f"module.label_smoothing={show(module.label_smoothing)} is for module.loss_type=robust "
                          f"(not {module.get('loss_type')}): set the loss type, or label_smoothing=0")
    reference = module.get("reference", "auto")
    if reference == "adapter" and not cfg.peft:
        raise ConfigError("module.reference=adapter needs an adapter to switch off: use peft=lora, or "
                          "module.reference=auto (a frozen copy for a full fine-tune)")
    if shards_parameters(cfg.strategy) and not cfg.peft and reference in ("auto", "copy"):
        raise ConfigError(f"module=dpo under strategy={cfg.strategy.name} would keep a whole frozen copy of the model "
                          "on every GPU as its reference: set module.reference=precomputed")
    if data.get("packing"):
        raise ConfigError("data.packing=true does not pack preference pairs yet: set data.packing=false")
    if data.source == "tiny_pairs" and data.num_examples is None:
        raise ConfigError("data=tiny_pairs generates data.num_examples pairs: give a number, e.g. data.num_examples=2000")
    if cfg.objective.metric == "val/exact_match":
        raise ConfigError("objective.metric=val/exact_match is not logged by module=dpo: use val/loss, "
                          f"{GENERATED_EXACT_MATCH} or one of {', '.join(DPO_METRICS)}")


EVAL_PREFIX = "eval/"  # what tunelab.evaluation logs: eval/<task>/<metric>
EVAL_FIELDS = {"limit": Rule(int, ">= 1", null=True), "batch_size": Rule(int, ">= 1"),
               "num_fewshot": Rule(int, ">= 0", null=True), "every_n_validations": Rule(int, ">= 1", null=True),
               "base": Rule(bool)}


EVAL_AUTO = OneOf("embedded", "off")


def resolve_auto_evaluation(cfg: DictConfig) -> tuple[str | None, str | None]:
    """eval=auto (the default) becomes eval=tiny's options where the run trains on the embedded task and lm_eval is
    installed, else none (eval=none's {}), so the checks after this one and the run see a plain option. Returns why
    auto left evaluation off, and the line that tells the run so (none where eval.auto=off asked for it)."""
    options = cfg.get("eval")
    if not options or "auto" not in options:
        return None, None
    when = options.auto
    if (problem := EVAL_AUTO.problem(when)) is not None:
        raise ConfigError(f"eval.auto={show(when)} {problem} (TUNELAB_EVAL_AUTO sets it)")
    why = line = None
    if when == "off":
        why = "TUNELAB_EVAL_AUTO=off" if os.environ.get("TUNELAB_EVAL_AUTO") == "off" else "eval.auto=off"
    elif (source := cfg.data.get("source")) != "tiny":
        why = f"eval=auto evaluates the embedded task only, not data.source={source}"
        line = (f"benchmark evaluation off: eval=auto evaluates the embedded task (data=tiny) only, not data.source="
                f"{source}; eval=hub eval.tasks=[arc_easy] for lm-eval's own tasks")
    elif importlib.util.find_spec("lm_eval") is None:
        why = "eval=auto: lm_eval is not installed"
        line = "benchmark evaluation off: lm_eval is not installed (pip install 'tunelab[eval]' to evaluate the embedded task)"
    with open_dict(cfg):
        if why is None:
            del cfg.eval["auto"]
        else:
            cfg.eval = {}
    return why, line


def check_evaluation(cfg: DictConfig) -> None:
    """The `eval` option (tunelab.evaluation), and an eval/<task>/<metric> objective against it. Whether a task exists
    and its data can be had is asked of the harness itself, before training (tunelab.evaluation.harness.check_tasks)."""
    off, line = resolve_auto_evaluation(cfg)
    options, metric = cfg.get("eval"), cfg.objective.metric
    if not options:
        if metric.startswith(EVAL_PREFIX):
            raise ConfigError(f"objective.metric={metric} is a benchmark score, and benchmark evaluation is off "
                              f"({off or 'eval=none'}): pick an eval option whose eval.tasks lists its task "
                              "(e.g. eval=tiny), or another objective.metric")
        if line:
            log.info(line)
        return
    tasks = options.get("tasks")
    if not isinstance(tasks, ListConfig) or not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ConfigError(f"eval.tasks={show(tasks)} must be a non-empty list of lm-eval task names, e.g. "
                          "eval.tasks=[tunelab_tiny,arc_easy]")
    for key, rule in EVAL_FIELDS.items():
        if (problem := rule.problem(options.get(key))) is not None:
            raise ConfigError(f"eval.{key}={show(options.get(key))} {problem}")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval needs the lm_eval package: pip install 'tunelab[eval]' (or eval=none)")
    if not metric.startswith(EVAL_PREFIX):
        return
    task = metric.removeprefix(EVAL_PREFIX).split("/")[0]
    if task not in tasks:
        raise ConfigError(f"objective.metric={metric}: task {task} is not in eval.tasks={show(tasks)}; add it there")
    if options.every_n_validations != 1:
        raise ConfigError(f"objective.metric={metric} is read at every validation (checkpoint, early stopping, a sweep's "
                          "pruner): set eval.every_n_validations=1")


def without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


def check_tracking_server(cfg: DictConfig) -> None:
    """An MLflow tracking server must answer before anything loads: MLflow's client would otherwise retry each request
    with back-off for minutes, after the model had loaded. Only a connection is tried (seconds at most)."""
    logger = cfg.get("logger")
    if not logger or not str(logger.get("_target_", "")).endswith("MLFlowLogger"):
        return
    uri = str(logger.tracking_uri)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # a local store (sqlite:, file:) or a managed one (databricks) that MLflow reaches its own way
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout=5):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"the MLflow tracking server at {without_credentials(uri)} does not answer ({reason}): start it "
                          "(make ui, or mlflow server), point MLFLOW_TRACKING_URI at one that runs, or use logger=csv") from error
