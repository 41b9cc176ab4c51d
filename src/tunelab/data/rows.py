"""A row → its training example: encoded by its format, then fitted to data.max_length by data.truncation.

Each example says what became of its row (`fate`), so a run can say how many rows it dropped or cut instead of losing
them silently: `kept`, `cut` (ends at an earlier turn's end, whole turns kept), `dropped` (longer than max_length with
no turn end to cut at, or data.truncation=drop) and `untrained` (no assistant turn). Only rows with a trained token
are trained on.
"""

import logging
from collections import Counter

from transformers import PreTrainedTokenizerBase

from tunelab.data.chat import Encoded, TemplateRewritesTurns, encode_chat, special_ids
from tunelab.data.formats import IGNORE_INDEX, split_prompt_answer

log = logging.getLogger(__name__)

TRUNCATION = ("cut_turns", "drop")
FATES = ("kept", "cut", "dropped", "untrained")


def encode_alpaca(row: dict, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """BOS and the filled template, unlabelled; the answer and EOS, labelled."""
    prompt, answer = split_prompt_answer(row, templates)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    return Encoded(ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, [len(ids)])


def encode_row(row: dict, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase,
               train_on: str = "all_assistant", specials: frozenset[int] | None = None) -> Encoded:
    if fmt == "alpaca":
        return encode_alpaca(row, templates, tokenizer)
    return encode_chat(row["messages"], tokenizer, train_on, specials)


def fit_to_length(encoded: Encoded, max_length: int, truncation: str) -> dict:
    """input_ids, labels and fate. The row ends with its last trained token (nothing after it is learned); one longer
    than max_length is cut after the last turn that fits (cut_turns) or dropped."""
    if not encoded.turn_ends:
        return {"input_ids": encoded.input_ids[:max_length], "labels": encoded.labels[:max_length], "fate": "untrained"}
    end, fate = encoded.turn_ends[-1], "kept"
    if end > max_length:
        fitting = [e for e in encoded.turn_ends if e <= max_length] if truncation == "cut_turns" else []
        end, fate = (fitting[-1], "cut") if fitting else (0, "dropped")
    return {"input_ids": encoded.input_ids[:end], "labels": encoded.labels[:end], "fate": fate}


def tokenize_row(row: dict, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 train_on: str = "all_assistant", truncation: str = "cut_turns") -> dict:
    return RowTokenizer(fmt, templates, tokenizer, max_length, train_on, truncation)(row)


class RowTokenizer:
    """tokenize_row as datasets' map calls it, the tokenizer's special tokens looked up once."""

    def __init__(self, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 train_on: str, truncation: str):
        self.fmt, self.templates, self.tokenizer = fmt, templates, tokenizer
        self.max_length, self.train_on, self.truncation = max_length, train_on, truncation
        self.specials = special_ids(tokenizer) if fmt == "chat" else None

    def __call__(self, row: dict, index: int | None = None) -> dict:
        try:
            encoded = encode_row(row, self.fmt, self.templates, self.tokenizer, self.train_on, self.specials)
        except TemplateRewritesTurns as error:
            if index is None:
                raise
            raise TemplateRewritesTurns(f"data row {index + 1}: {error}") from None
        return fit_to_length(encoded, self.max_length, self.truncation)


def is_trained(example: dict) -> bool:
    return example["fate"] in ("kept", "cut")


def count_fates(fates: list[str]) -> dict[str, int]:
    counts = Counter(fates)
    return {fate: counts.get(fate, 0) for fate in FATES}


def report_rows(counts: dict[str, int], max_length: int, truncation: str, trainer=None, chat_template: str | None = None
                ) -> None:
    """Says how many rows were cut, dropped or had nothing to train on, and logs the counts (data/rows_*) and the chat
    template the rows were rendered with (chat_template.jinja, for MLflow) with the trainer's logger."""
    if counts["cut"] or counts["dropped"] or counts["untrained"]:
        log.info("data: of %d rows, %d cut at a turn's end and %d dropped (longer than data.max_length=%d, "
                 "data.truncation=%s), %d with no assistant turn to train on", sum(counts.values()), counts["cut"],
                 counts["dropped"], max_length, truncation, counts["untrained"])
    logger = trainer.logger if trainer is not None and trainer.is_global_zero else None
    if logger is None:
        return
    logger.log_metrics({f"data/rows_{fate}": float(count) for fate, count in counts.items()}, step=0)
    from lightning.pytorch.loggers import MLFlowLogger

    if chat_template is not None and isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, chat_template, "chat_template.jinja")
