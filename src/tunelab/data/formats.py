"""Rows → text → token ids: a row's format (alpaca or chat), the prompt it is conditioned on and the answer it learns,
and their tokenization with the prompt masked out of the labels."""

import hashlib
import json

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Bump when tokenize_example changes, so cached tokenizations made by older code are not reused.
TOKENIZATION_VERSION = 1


def detect_format(columns: list[str]) -> str:
    if "messages" in columns:
        return "chat"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    raise ValueError(
        f"cannot tell the data format from columns {columns}: give alpaca rows (instruction, input, output) "
        "or chat rows (messages)"
    )


def split_prompt_answer(row: dict, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text the model is conditioned on and the text it learns to produce."""
    if fmt == "alpaca":
        with_input, without_input = templates
        template = with_input if row.get("input") else without_input
        return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]
    messages = row["messages"]
    if messages[-1]["role"] != "assistant":
        raise ValueError("a chat row must end with an assistant message, the one the model learns")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
    return prompt, answer


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
