"""module=grpo (tunelab.modules.grpo): its keys, its reward functions and what it samples from, from the config
alone; an objective of GRPO's own metric is refused for other modules."""

import inspect

from omegaconf import DictConfig, OmegaConf

from tunelab.config.fields import GRPO_FIELDS, Rule
from tunelab.config.training import GRPO_METRICS
from tunelab.errors import ConfigError, show
from tunelab.strategy import shards_parameters

GRPO_MODULE = "tunelab.modules.grpo.GRPOModule"
INSTRUCTION_DATA = "tunelab.data.InstructionDataModule"
REWARD_EXAMPLE = "module.rewards='[{_target_: tunelab.rewards.exact_match, weight: 1.0}]'"


def is_grpo(cfg: DictConfig) -> bool:
    return bool(cfg.get("module")) and cfg.module.get("_target_") == GRPO_MODULE


def check_grpo(cfg: DictConfig) -> None:
    """module=grpo's keys and reward functions from the config alone (its prompts against the model's context wait
    for the tokenizer: tunelab.inputs.check_grpo_inputs)."""
    if not is_grpo(cfg):
        if cfg.objective.metric in GRPO_METRICS:
            raise ConfigError(f"objective.metric={cfg.objective.metric} is logged by module=grpo only: pick another "
                              "objective.metric, or use module=grpo")
        return
    module = cfg.module
    for field, rule in GRPO_FIELDS.items():
        key = field.removeprefix("module.")
        if key in module and (problem := rule.problem(module[key])):
            if key == "num_generations":
                problem += ": advantages compare the completions of one prompt with each other"
            raise ConfigError(f"module.{key}={show(module[key])} {problem}")
    if module.get("epsilon_high") is not None and module.epsilon_high < module.epsilon:
        raise ConfigError(f"module.epsilon_high={show(module.epsilon_high)} is below module.epsilon="
                          f"{show(module.epsilon)}: the upper clip bound is 1 + epsilon_high (null: epsilon)")
    check_rewards(module.get("rewards"))
    if module.get("beta") and module.get("reference") == "adapter" and not cfg.peft:
        raise ConfigError("module.reference=adapter needs an adapter to switch off: use peft=lora, or "
                          "module.reference=auto (a frozen copy for a full fine-tune)")
    data = cfg.data
    if data.get("_target_") != INSTRUCTION_DATA or data.get("source") == "random_tokens":
        raise ConfigError(f"module=grpo samples completions of the SFT data's prompts: data={data.get('source')} has "
                          "none; use data=tiny, alpaca, jsonl (alpaca or chat rows) or mix")
    if data.get("packing"):
        raise ConfigError("module=grpo reads one prompt a row: set data.packing=false")
    if module.get("num_iterations", 1) > 1 and cfg.trainer.accumulate_grad_batches != 1:
        raise ConfigError(f"module.num_iterations={module.num_iterations} counts optimizer steps on one batch of "
                          "completions: set trainer.accumulate_grad_batches=1 (raise data.batch_size instead)")
    if shards_parameters(cfg.strategy):
        raise ConfigError(f"module=grpo does not run under strategy={cfg.strategy.name} yet (sampling from a sharded "
                          "model): use strategy=auto or strategy=ddp")


def check_rewards(rewards) -> None:
    """module.rewards: a non-empty list of {_target_: a function, weight: a number, its keyword arguments}, each
    function imported and its signature bound to what GRPO calls it with."""
    from tunelab.targets import import_target

    entries = OmegaConf.to_container(rewards, resolve=True) if rewards is not None and not isinstance(rewards, list) \
        else rewards
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"module.rewards={show(rewards)} must be a non-empty list of reward functions, e.g. "
                          f"{REWARD_EXAMPLE}")
    for index, entry in enumerate(entries):
        key = f"module.rewards[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("_target_"), str):
            raise ConfigError(f"{key}={show(entry)} needs a _target_: the import path of a function (prompts, "
                              f"completions, **row) -> list[float], e.g. {REWARD_EXAMPLE}")
        weight = entry.get("weight", 1.0)
        if problem := Rule(float).problem(weight):
            raise ConfigError(f"{key}.weight={show(weight)} {problem}")
        path = entry["_target_"]
        function = import_target(f"{key}._target_", path)
        if inspect.isclass(function) or not callable(function):
            raise ConfigError(f"{key}._target_={path} is not a function: a reward is a function (prompts, completions, "
                              "**row) -> list[float]")
        arguments = {name: value for name, value in entry.items() if name not in ("_target_", "weight")}
        try:
            inspect.signature(function).bind([], [], answer=[], **arguments)
        except TypeError as error:
            raise ConfigError(f"{key}._target_={path}: {error}; GRPO calls it with (prompts, completions, answer=...) "
                              f"and the entry's other keys") from None
        except ValueError:  # a callable Python cannot introspect: its first call will tell
            pass
