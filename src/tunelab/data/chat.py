"""Chat rows → token ids with a label on every token an assistant turn writes, found from the template's own rendering.

Where the template marks what the assistant writes (`{% generation %}` blocks), transformers' assistant-token mask
gives the turns. Otherwise each assistant turn is the text that rendering the conversation through that message adds
to rendering it up to the message with the generation prompt; this holds only if each shorter conversation renders as
a prefix of the whole, which is checked: a template that rewrites earlier turns once later ones follow (one that
drops past reasoning) would otherwise train on text the model never sees at inference.

A turn is trained through the first end-of-turn the template writes after it, once: the last special token in the
turn's text (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`); what the template writes after
it (ChatML's newline) is not the model's to predict, generation stops before it. A template whose turns end in plain
text gets the tokenizer's EOS after each assistant turn, so the model still learns to stop.
"""

import bisect
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunelab.errors import ConfigError
from tunelab.data.formats import IGNORE_INDEX

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
TRAIN_ON = ("all_assistant", "last_assistant")


class TemplateRewritesTurns(ConfigError):
    """The chat template renders an earlier turn differently once later turns follow."""


@dataclass
class Encoded:
    """A row's token ids and labels, and the index after each trained turn (where a row may be cut)."""

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(tokenizer.all_special_ids) | added


def encode_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, train_on: str = "all_assistant",
                specials: frozenset[int] | None = None) -> Encoded:
    """The conversation's tokens, each assistant turn labelled (only the last one with train_on=last_assistant).
    Turns after the last trained one are left out: nothing in them is learned. A row with no assistant turn gives
    no labels."""
    specials = special_ids(tokenizer) if specials is None else specials
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return Encoded(list(ids), [IGNORE_INDEX] * len(ids), [])
    messages = messages[: assistant[-1] + 1]
    if GENERATION_BLOCK.search(tokenizer.get_chat_template()):
        ids, runs = generation_runs(messages, tokenizer)
    else:
        ids, runs = rendered_runs(messages, assistant[-1:] if train_on == "last_assistant" else assistant, tokenizer)
    if train_on == "last_assistant":
        runs = runs[-1:]
    return label_turns(ids, runs, specials, tokenizer.eos_token_id)


def generation_runs(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and the [start, end) token runs the template's `{% generation %}` blocks cover."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    runs, start = [], None
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return list(out["input_ids"]), runs


def rendered_runs(messages: list[dict], assistant: list[int], tokenizer: PreTrainedTokenizerBase
                  ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and the token runs of each assistant turn, from rendering growing prefixes of the conversation."""
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index in assistant:
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False) if index else ""
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(prompt) and whole.startswith(through)):
            raise TemplateRewritesTurns(
                f"the chat template renders message {index + 1} (an assistant turn) differently once later messages "
                "follow, so its trained tokens would not be the ones the model sees at "
                "inference: set data.train_on=last_assistant, or give a template that keeps earlier turns as they are "
                "(model.chat_template=)")
        spans.append((len(prompt), len(through)))
    if not tokenizer.is_fast:  # no offsets: each piece on its own, cut at the turns' edges
        ids, runs, position = [], [], 0
        for start, end in spans:
            ids += tokenizer(whole[position:start], add_special_tokens=False)["input_ids"]
            turn = tokenizer(whole[start:end], add_special_tokens=False)["input_ids"]
            runs.append((len(ids), len(ids) + len(turn)))
            ids += turn
            position = end
        return ids, runs
    encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    firsts, lasts = zip(*encoding["offset_mapping"]) if encoding["input_ids"] else ((), ())
    runs = []
    for start, end in spans:  # every token that overlaps the span, as transformers' assistant mask counts them
        first, last = bisect.bisect_right(lasts, start), bisect.bisect_left(firsts, end)
        if first < last:
            runs.append((first, last))
    return list(encoding["input_ids"]), runs


def label_turns(ids: list[int], runs: list[tuple[int, int]], specials: frozenset[int], eos_token_id: int) -> Encoded:
    """Labels each run through its end-of-turn token, or through an EOS put after it where the run has none."""
    input_ids, labels, turn_ends, position = [], [], [], 0
    for start, end in runs:
        input_ids += ids[position:start]
        labels += [IGNORE_INDEX] * (start - position)
        turn = ids[start:end]
        last_special = max((i for i, token in enumerate(turn) if token in specials), default=None)
        if last_special is None:
            trained, rest = turn + [eos_token_id], []
        else:
            trained, rest = turn[: last_special + 1], turn[last_special + 1:]
        input_ids += trained
        labels += trained
        turn_ends.append(len(input_ids))
        input_ids += rest
        labels += [IGNORE_INDEX] * len(rest)
        position = end
    input_ids += ids[position:]
    labels += [IGNORE_INDEX] * (len(ids) - position)
    return Encoded(input_ids, labels, turn_ends)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens an assistant turn ends with under the tokenizer's chat template (where generation must stop):
    the end-of-turn token of a one-turn conversation's answer, and the EOS."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    encoded = encode_chat(messages, tokenizer)
    ends = [encoded.input_ids[end - 1] for end in encoded.turn_ends]
    return list(dict.fromkeys([*ends, tokenizer.eos_token_id]))
