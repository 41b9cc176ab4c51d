"""Rewards that a program checks, for module=grpo (tunelab.modules.grpo): each a plain function
`(prompts, completions, **row) -> list[float]`, one reward per completion.

`prompts` and `completions` are text (special tokens left out), one entry per completion: each prompt appears
`module.num_generations` times in a row. `row` holds the data row's other fields the same way: `answer` (the row's own
answer, what SFT trained on). A reward takes what it needs by name and the rest as `**row`, so new fields never break
it. Config keys beside `_target_` (and `weight`) are the function's own keyword arguments:

    module:
      rewards:
        - {_target_: tunelab.rewards.exact_match, weight: 1.0}
        - {_target_: tunelab.rewards.format_match, pattern: "[A-Za-z]+", weight: 0.2}
        - {_target_: mypackage.rewards.my_reward, weight: 0.5}
"""

import re

from tunelab.tiny_task import OPERATIONS


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **row) -> list[float]:
    """1.0 where the completion is the row's answer (surrounding whitespace aside), else 0.0."""
    return [float(completion.strip() == expected.strip()) for completion, expected in zip(completions, answer)]


def embedded_task(prompts: list[str], completions: list[str], **row) -> list[float]:
    """1.0 where the completion is what the embedded task's operation gives for the prompt's word (`double abc=`:
    `abcabc`, tunelab.tiny_task.OPERATIONS), else 0.0. The program computes the answer from the prompt rather than
    reading the row's, so it holds where the rows' answers are wrong (data=tiny_flawed)."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        instruction, _, word = prompt.strip().removesuffix("=").partition(" ")
        operation = OPERATIONS.get(instruction)
        rewards.append(float(operation is not None and completion.strip() == operation(word)))
    return rewards


def format_match(prompts: list[str], completions: list[str], pattern: str = r"\S+", **row) -> list[float]:
    """1.0 where the whole completion matches the regular expression `pattern`, else 0.0: the answer's form, whether
    or not it is right (on the embedded task, letters only: "[A-Za-z]+")."""
    form = re.compile(pattern, re.DOTALL)
    return [float(form.fullmatch(completion.strip()) is not None) for completion in completions]


def length_penalty(prompts: list[str], completions: list[str], max_chars: int = 64, **row) -> list[float]:
    """0.0 up to `max_chars` characters, then down by 1 for every further `max_chars`, to -1.0 at most: keeps
    completions from running on (the soft length penalty of DAPO, Yu et al. 2025, counted in characters, so it does
    not depend on the tokenizer)."""
    return [-min(1.0, max(0, len(completion) - max_chars) / max_chars) for completion in completions]


class RewardError(ValueError):
    """A reward function that returned something other than one number per completion: the run stops with this line."""
