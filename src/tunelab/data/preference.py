"""Preference pairs → a chosen and a rejected example of the same prompt, for DPO (tunelab.modules.dpo).

A pair row holds `prompt`, `chosen` and `rejected`: plain text (`alpaca`: the prompt fills data.prompt_template as an
alpaca row's instruction does, with an optional `input`; chosen and rejected are the answers), or a conversation
(`chat`: the prompt a list of messages, chosen and rejected the assistant's continuations, each a list of messages or
one assistant message's text). Each side is encoded exactly as an SFT row with that answer would be (tunelab.data.rows,
tunelab.data.chat): the same template, BOS/EOS, end-of-turn labels, and data.max_length / data.truncation policy.
Only the continuation is labelled: assistant turns inside a chat prompt are context. A pair is trained on only when
both sides keep a labelled token.

A batch holds the chosen rows, then the rejected ones, padded to one width, so both go through the model in one
forward; `index` is each pair's row in its split (the key of precomputed reference log-probabilities). With
data.packing=true a training batch is one packed row instead (tunelab.data.PackedCollator, the varlen layout SFT
packing uses): whole pairs up to data.pack_tokens, their chosen sides then their rejected sides, each a segment that
attends only to itself, so every sequence's log-probability is the one it has alone in a padded row.
"""

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from tunelab.data.chat import Encoded, encode_chat, special_ids
from tunelab.data.collators import PackedCollator
from tunelab.data.datamodule import InstructionDataModule, load_rows
from tunelab.data.formats import IGNORE_INDEX, TOKENIZATION_VERSION, tokenizer_fingerprint
from tunelab.data.rows import count_fates, encode_alpaca, fit_to_length, report_rows
from tunelab.data.samplers import PackedBatchSampler, pack_in_order, resumable_sampler, resume_position
from tunelab.tiny_task import OPERATIONS, SHORT_WORDS, make_example

log = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt", "chosen", "rejected")
FORMAT_FIELDS = {
    "alpaca": "prompt, chosen and rejected strings (input optional)",
    "chat": "prompt, a list of {role, content} messages, and chosen and rejected, each the assistant's reply (a "
            "string or a list of messages)",
}
# Columns of a tokenized pair: the chosen side keeps the names of an SFT example, so what reads SFT rows (the
# generation samples callback) reads the chosen answer.
COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
PAIR_TOKENIZATION_VERSION = 1


def pair_format(row: dict) -> str:
    """`chat` where the prompt is a list of messages, else `alpaca`."""
    return "chat" if isinstance(row.get("prompt"), list) else "alpaca"


def continuation(value) -> list[dict]:
    """A chat pair's chosen or rejected side as messages: a bare string is one assistant message."""
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else list(value)


def is_message(message) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def pair_problem(row, fmt: str) -> str | None:
    """What keeps a row from being a preference pair of the format, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    for field in PAIR_FIELDS:
        if row.get(field) is None:
            return f"has no {field}"
    if fmt == "alpaca":
        for field in (*PAIR_FIELDS, "input"):
            if row.get(field) is not None and not isinstance(row[field], str):
                return f"has {field}={snippet(row[field])}, not a string"
    else:
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt or not all(is_message(m) for m in prompt):
            return f"has prompt={snippet(prompt)}, not a list of {{role, content}} messages"
        for field in ("chosen", "rejected"):
            side = row[field]
            if not isinstance(side, str) and not (isinstance(side, list) and side and all(is_message(m) for m in side)):
                return f"has {field}={snippet(side)}, neither a string nor a list of {{role, content}} messages"
            if continuation(side)[-1]["role"] != "assistant":
                return f"has a {field} reply that does not end with an assistant message"
    if row["chosen"] == row["rejected"]:
        return "has chosen equal to rejected: the pair prefers nothing"
    return None


def snippet(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def encode_side(row: dict, side: str, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase,
                specials: frozenset[int] | None) -> Encoded:
    """One side of a pair, encoded as the SFT row whose answer it is; a chat prompt's own assistant turns unlabelled."""
    if fmt == "alpaca":
        return encode_alpaca({"instruction": row["prompt"], "input": row.get("input"), "output": row[side]}, templates,
                             tokenizer)
    prompt = list(row["prompt"])
    encoded = encode_chat(prompt + continuation(row[side]), tokenizer, "all_assistant", specials)
    in_prompt = sum(message["role"] == "assistant" for message in prompt)
    if in_prompt:
        context_end = encoded.turn_ends[in_prompt - 1]
        labels = [IGNORE_INDEX] * context_end + encoded.labels[context_end:]
        encoded = Encoded(encoded.input_ids, labels, encoded.turn_ends[in_prompt:])
    return encoded


class PairTokenizer:
    """A pair row → COLUMNS and its fate (tunelab.data.rows): `dropped` or `untrained` where either side is, `cut`
    where either side was cut at a turn's end, else `kept`."""

    def __init__(self, fmt: str, templates: tuple[str, str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 truncation: str = "cut_turns"):
        self.fmt, self.templates, self.tokenizer = fmt, templates, tokenizer
        self.max_length, self.truncation = max_length, truncation
        self.specials = special_ids(tokenizer) if fmt == "chat" else None

    def __call__(self, row: dict, index: int | None = None) -> dict:
        chosen, rejected = (fit_to_length(encode_side(row, side, self.fmt, self.templates, self.tokenizer, self.specials),
                                          self.max_length, self.truncation) for side in ("chosen", "rejected"))
        fates = {chosen["fate"], rejected["fate"]}
        fate = next(f for f in ("dropped", "untrained", "cut", "kept") if f in fates)
        return {"input_ids": chosen["input_ids"], "labels": chosen["labels"], "rejected_input_ids": rejected["input_ids"],
                "rejected_labels": rejected["labels"], "fate": fate}


class PreferenceCollator:
    """The batch's chosen rows, then its rejected rows, right-padded to the longest of all (padding masked out of
    attention and labels), and each pair's `index` in its split."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        sides = [(p["input_ids"], p["labels"]) for p in pairs] + [(p["rejected_input_ids"], p["rejected_labels"]) for p in pairs]
        width = max(len(ids) for ids, _ in sides)
        input_ids = torch.full((len(sides), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sides), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sides), width), dtype=torch.long)
        for i, (ids, row_labels) in enumerate(sides):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(ids)] = torch.tensor(row_labels)
            attention_mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "index": torch.tensor([p["index"] for p in pairs], dtype=torch.long)}


class PackedPairCollator:
    """Whole pairs in one packed row of `budget` tokens: the chosen sides, then the rejected sides, in the order of the
    pairs (tunelab.data.PackedCollator's varlen layout), and each pair's `index`."""

    def __init__(self, pad_token_id: int, budget: int):
        self.pack = PackedCollator(pad_token_id, budget)

    def __call__(self, pairs: list[dict]) -> dict:
        sides = [{"input_ids": p["input_ids"], "labels": p["labels"]} for p in pairs] + \
                [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
        return {**self.pack(sides), "index": torch.tensor([p["index"] for p in pairs], dtype=torch.long)}


def pair_lengths(dataset: Dataset) -> list[int]:
    """Each pair's tokens in a packed row: both its sides."""
    return [len(chosen) + len(rejected) for chosen, rejected in zip(dataset["input_ids"], dataset["rejected_input_ids"])]


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs from the embedded task (source=tiny_pairs), a JSON-lines file or the Hub, split, tokenized
    and served like InstructionDataModule's rows (resumable order, cached tokenization, row fates logged)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str, path: str | None, split: str,
                 num_examples: int | None, format: str, prompt_template: str, prompt_template_no_input: str,
                 max_length: int, batch_size: int, val_size: float, max_val_examples: int | None, num_workers: int,
                 seed: int, cache_dir: str, truncation: str = "cut_turns", packing: bool = False,
                 pack_tokens: int | None = None):
        super().__init__(tokenizer=tokenizer, source=source, path=path, split=split, num_examples=num_examples,
                         format=format, prompt_template=prompt_template, prompt_template_no_input=prompt_template_no_input,
                         max_length=max_length, batch_size=batch_size, val_size=val_size,
                         max_val_examples=max_val_examples, num_workers=num_workers, seed=seed, cache_dir=cache_dir,
                         truncation=truncation, packing=packing, pack_tokens=pack_tokens)
        self.pack_tokens = pack_tokens or 2 * batch_size * max_length  # batch_size pairs, two sides each

    def prepare_data(self) -> None:
        self.tokenized()

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        splits = self.tokenized().train_test_split(test_size=self._val_count(), seed=self.seed, shuffle=True)
        self.train, self.val = splits["train"], splits["test"]
        if self.max_val_examples is not None and len(self.val) > self.max_val_examples:
            self.val = self.val.select(range(self.max_val_examples))
        self.train = self.train.add_column("index", list(range(len(self.train))))
        self.val = self.val.add_column("index", list(range(len(self.val))))
        log.info("data: %d train / %d val pairs", len(self.train), len(self.val))
        template = self.tokenizer.get_chat_template() if self.format == "chat" else None
        report_rows(self.row_fates, self.max_length, self.truncation, self.trainer, template)

    def tokenized(self, *_) -> Dataset:
        rows = load_pair_rows(self.source, self.path, self.split, self.num_examples, self.cache_dir, self.seed)
        fmt = pair_format(rows[0]) if self.format == "auto" else self.format
        self.format = self.resolved_format = fmt  # what the export records as the prompt format (tunelab.export)
        tokenize = PairTokenizer(fmt, self.templates, self.tokenizer, self.max_length, self.truncation)
        fingerprint = "pairs-" + hashlib.sha256(json.dumps([
            rows._fingerprint, tokenizer_fingerprint(self.tokenizer), fmt, self.templates, self.max_length,
            self.truncation, TOKENIZATION_VERSION, PAIR_TOKENIZATION_VERSION]).encode()).hexdigest()[:16]
        tokenized = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, new_fingerprint=fingerprint,
                             desc="tokenizing pairs")
        self.row_fates = count_fates(tokenized["fate"])
        trained = tokenized.filter(lambda fate: fate in ("kept", "cut"), input_columns="fate",
                                   new_fingerprint=f"{fingerprint}-trained")
        return trained.remove_columns("fate")

    def train_dataloader(self) -> DataLoader:
        if self.packing:
            trainer = self.trainer
            sampler = PackedBatchSampler(pair_lengths(self.train), self.pack_tokens, self.seed, trainer.world_size,
                                         trainer.global_rank)
            return self._packed_pair_loader(self.train, resume_position(sampler, trainer))
        sampler = resumable_sampler(self.trainer, len(self.train), self.seed, self.batch_size)
        return self._pair_loader(self.train, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._pair_loader(self.val, None)

    def pairs_loader(self, split: str) -> DataLoader:
        """Every pair of a split (train or val) in order, batched as that split is (packed or not), for computing
        reference log-probabilities once."""
        if split == "train" and self.packing:
            lengths = pair_lengths(self.train)
            return self._packed_pair_loader(self.train, pack_in_order(list(range(len(lengths))), lengths, self.pack_tokens))
        return self._pair_loader(self.train if split == "train" else self.val, None)

    def _packed_pair_loader(self, dataset: Dataset, batch_sampler) -> DataLoader:
        return DataLoader(dataset.with_format(columns=[*COLUMNS, "index"]), batch_sampler=batch_sampler,
                          collate_fn=PackedPairCollator(self.tokenizer.pad_token_id, self.pack_tokens),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _pair_loader(self, dataset: Dataset, sampler) -> DataLoader:
        return DataLoader(dataset.with_format(columns=[*COLUMNS, "index"]), batch_size=self.batch_size, sampler=sampler,
                          shuffle=False, drop_last=sampler is not None, collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


# ── the embedded preference task ──────────────────────────────────────────────────────────────────────────────────

TINY_PAIRS_VERSION = 2


def make_pair(rng: random.Random) -> dict[str, str]:
    """`double <word>` of the embedded task on a short word as a pair: the word twice chosen, the answer stopped after
    one copy rejected (the flaw data=tiny_flawed teaches)."""
    word = make_example(rng, SHORT_WORDS)["input"]
    return {"prompt": "double", "input": word, "chosen": OPERATIONS["double"](word), "rejected": word}


def write_tiny_pairs(directory: Path, num_examples: int, seed: int) -> Path:
    """The embedded preference task as JSON lines, written once per (size, seed). Its words are drawn from another
    stream than the SFT task's (seed + 1), so DPO is validated on prompts SFT did not train on."""
    path = Path(directory) / f"tiny-pairs-v{TINY_PAIRS_VERSION}-{num_examples}-seed{seed}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for _ in range(num_examples):
            f.write(json.dumps(make_pair(rng)) + "\n")
    tmp.replace(path)  # atomic, so parallel sweep workers never read half a file
    return path


def tiny_pairs_file(cache_dir: str, num_examples: int, seed: int) -> Path:
    return write_tiny_pairs(Path(cache_dir) / "tiny_task", num_examples, seed)


def load_pair_rows(source: str, path: str | None, split: str, num_examples: int | None, cache_dir: str, seed: int) -> Dataset:
    if source == "tiny_pairs":
        source, path = "jsonl", str(tiny_pairs_file(cache_dir, num_examples, seed))
    return load_rows(source, path, split, num_examples, cache_dir, seed)
