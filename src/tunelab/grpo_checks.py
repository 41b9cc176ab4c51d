"""module=grpo's checks (tunelab.modules.grpo), each a ConfigError line: its keys and reward functions from the config
alone (check_grpo_config, in tunelab.config's pass), then its prompts against the model's context and its rewards'
answers on a real row (check_grpo_inputs, in tunelab.inputs' pass, once the tokenizer is loaded). Both run before any
weights load."""

import inspect

from omegaconf import DictConfig, OmegaConf

from tunelab.config import GRPO_METRICS, ConfigError, OneOf, Rule, show
from tunelab.strategy import shards_parameters

GRPO_MODULE = "tunelab.modules.grpo.GRPOModule"
INSTRUCTION_DATA = "tunelab.data.InstructionDataModule"
GRPO_FIELDS = {
    "num_generations": Rule(int, ">= 2"), "max_new_tokens": Rule(int, ">= 1"), "temperature": Rule(float, "> 0"),
    "top_p": Rule(float, "> 0", "<= 1"), "num_iterations": Rule(int, ">= 1"), "epsilon": Rule(float, "> 0", "< 1"),
    "epsilon_high": Rule(float, "> 0", null=True), "beta": Rule(float, ">= 0"),
    "reference": OneOf("auto", "adapter", "copy"), "scale_rewards": Rule(bool),
    "loss_type": OneOf("sequence_mean", "token_mean", "dr_grpo"), "seed": Rule(int, ">= 0"),
}
REWARD_EXAMPLE = "module.rewards='[{_target_: tunelab.rewards.exact_match, weight: 1.0}]'"


def is_grpo(cfg: DictConfig) -> bool:
    return bool(cfg.get("module")) and cfg.module.get("_target_") == GRPO_MODULE


def check_grpo_config(cfg: DictConfig) -> None:
    if not is_grpo(cfg):
        if cfg.objective.metric in GRPO_METRICS:
            raise ConfigError(f"objective.metric={cfg.objective.metric} is logged by module=grpo only: pick another "
                              "objective.metric, or use module=grpo")
        return
    module = cfg.module
    for key, rule in GRPO_FIELDS.items():
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


def check_grpo_inputs(cfg: DictConfig, tokenizer) -> None:
    """The rows' prompts leave room for max_new_tokens in the model's context, and every reward gives one number per
    completion on the first row (its own answer, and an empty completion, as the group)."""
    if not is_grpo(cfg) or cfg.data.get("sources"):
        return
    from tunelab.data import load_rows
    from tunelab.data.formats import detect_format
    from tunelab.data.rows import RowTokenizer
    from tunelab.inputs import model_config
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
