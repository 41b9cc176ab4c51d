"""A row's format (alpaca or chat); an alpaca row's prompt and answer, tokenized with the prompt masked out of the
labels (chat rows: tunelab.data.chat; both fitted to data.max_length: tunelab.data.rows)."""

import hashlib
import json

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Bump when a row's tokenization changes, so cached tokenizations made by older code are not reused.
TOKENIZATION_VERSION = 2


def detect_format(columns: list[str]) -> str:
    if "messages" in columns:
        return "chat"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    raise ValueError(
        f"cannot tell the data format from columns {columns}: give alpaca rows (instruction, input, output) "
        "or chat rows (messages)"
    )


def split_prompt_answer(row: dict, templates: tuple[str, str]) -> tuple[str, str]:
    """An alpaca row's prompt (the template without `{input}` where it has no input) and the answer it learns."""
    with_input, without_input = templates
    template = with_input if row.get("input") else without_input
    return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]


def tokenize_example(prompt: str, answer: str, tokenizer: PreTrainedTokenizerBase, max_length: int, add_bos: bool) -> dict:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    return hashlib.sha256(f"{vocab}|{template}|{tokenizer.bos_token}|{tokenizer.eos_token}".encode()).hexdigest()[:16]
