"""The field table: what each key of each group may hold. Checked first, so the checks after it, which relate keys to
each other and to the hardware, can trust what they read. A group's fields are listed here and nowhere else; the
choices a builder implements come from its own module (kernel_choice, precision, strategy, tiny_task)."""

import operator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import ConfigError, show
from tunelab.kernel_choice import COMPILES, FUSED_OPS, LOSSES
from tunelab.precision import FLOAT8_LAYERS, FLOAT8_RECIPES
from tunelab.strategy import AUTO_WRAP_CHOICES
from tunelab.tiny_task import TINY_SOURCES

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
PROFILERS = (None, "simple", "advanced", "pytorch")


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
    "data.streaming": Rule(bool),
    "data.shuffle_block": Rule(int, ">= 1"),

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

    "kernels.loss": OneOf(*LOSSES),
    "kernels.compile": OneOf(*COMPILES),
    "kernels.fused_ops": OneOf(*FUSED_OPS),
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

# module=dpo's keys (tunelab.modules.dpo); another module's keys of the same names are its own.
DPO_FIELDS = {
    "module.beta": Rule(float, "> 0"),
    "module.loss_type": OneOf("sigmoid", "ipo", "robust", "simpo", "orpo"),
    "module.label_smoothing": Rule(float, ">= 0", "< 0.5"),
    "module.reference": OneOf("auto", "adapter", "copy", "precomputed"),
    "module.sft_weight": Rule(float, ">= 0"),
    "module.gamma": Rule(float, ">= 0", null=True),
    "module.orpo_lambda": Rule(float, "> 0", null=True),
}

GRPO_FIELDS = {
    "module.num_generations": Rule(int, ">= 2"),
    "module.max_new_tokens": Rule(int, ">= 1"),
    "module.temperature": Rule(float, "> 0"),
    "module.top_p": Rule(float, "> 0", "<= 1"),
    "module.num_iterations": Rule(int, ">= 1"),
    "module.epsilon": Rule(float, "> 0", "< 1"),
    "module.epsilon_high": Rule(float, "> 0", null=True),
    "module.beta": Rule(float, ">= 0"),
    "module.reference": OneOf("auto", "adapter", "copy"),
    "module.scale_rewards": Rule(bool),
    "module.loss_type": OneOf("sequence_mean", "token_mean", "dr_grpo"),
    "module.seed": Rule(int, ">= 0"),
}

# The eval option's keys once eval=auto has become a plain option (tunelab.config.evaluation); eval.tasks is checked
# there, as a list of task names.
EVAL_AUTO = OneOf("embedded", "off")
EVAL_FIELDS = {
    "eval.limit": Rule(int, ">= 1", null=True),
    "eval.batch_size": Rule(int, ">= 1"),
    "eval.num_fewshot": Rule(int, ">= 0", null=True),
    "eval.every_n_validations": Rule(int, ">= 1", null=True),
    "eval.base": Rule(bool),
}

# The keys of one data.sources entry; its source, split, format and num_examples are held to the data.* rules above.
SOURCE_KEYS = ("name", "source", "path", "split", "format", "weight", "num_examples")
ABSENT = object()


def check_fields(cfg: DictConfig, fields: dict = FIELDS, absent: Any = ABSENT) -> None:
    """Each key of `fields` against its rule; a key the config lacks is skipped, or read as `absent` where given."""
    for key, rule in fields.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is not ABSENT and (problem := rule.problem(value)):
            raise ConfigError(f"{key}={show(value)} {problem}")
