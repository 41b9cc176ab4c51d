"""Builds the `data` group: instruction rows → tokenized, prompt-masked, dynamically padded batches."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from datasets import Dataset, load_dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from tunelab.targets import build_target
from tunelab.tiny_task import write_tiny_task

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when tokenize_example changes, so cached tokenizations made by older code are not reused.
TOKENIZATION_VERSION = 1


def tiny_task_file(cache_dir: str, num_examples: int, seed: int) -> Path:
    """The embedded task's rows as a JSON-lines file, written once per (size, seed) under the cache."""
    return write_tiny_task(Path(cache_dir) / "tiny_task", num_examples, seed)


def load_rows(source: str, path: str | None, split: str, num_examples: int | None, cache_dir: str, seed: int) -> Dataset:
    datasets_cache = str(Path(cache_dir) / "datasets")
    if source == "tiny":
        path = str(tiny_task_file(cache_dir, num_examples, seed))
        source = "jsonl"
    if source == "jsonl":
        rows = load_dataset("json", data_files=path, split="train", cache_dir=datasets_cache)
    else:
        rows = load_dataset(path, split=split, cache_dir=datasets_cache)
    if num_examples is not None and len(rows) > num_examples:
        rows = rows.select(range(num_examples))
    return rows


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


class InstructionCollator:
    """Pads each batch to its own longest row; padding is masked out of attention and of the loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def model_inputs(batch: dict) -> dict:
    """What the model is called with. tunelab's collators pad on the right, where causal attention alone keeps every
    real token from seeing padding, so the padding mask is left out: transformers then builds no mask and makes no
    check of one on the host (a GPU sync each forward). The mask stays in the batch for counting tokens."""
    return {key: value for key, value in batch.items() if key != "attention_mask"}


class PackedCollator:
    """Concatenates a batch's examples into one row of exactly `budget` tokens (the rest padding), for varlen
    attention (tunelab.packing): positions restart at 0 for each example, `cu_seq_lens_*` mark where each example (and
    the trailing padding, a segment of its own) starts, and each example's first label is -100, so no position learns
    the next example's first token. Shapes never change, so compiled layers see one shape."""

    def __init__(self, pad_token_id: int, budget: int):
        self.pad_token_id = pad_token_id
        self.budget = budget

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(row["input_ids"]) for row in rows]
        used = sum(lengths)
        if used > self.budget:
            raise ValueError(f"packed examples hold {used} tokens, more than the budget of {self.budget}")
        segments = lengths + ([self.budget - used] if used < self.budget else [])
        input_ids = torch.full((1, self.budget), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, self.budget), IGNORE_INDEX, dtype=torch.long)
        start = 0
        for row, n in zip(rows, lengths):
            input_ids[0, start:start + n] = torch.tensor(row["input_ids"])
            labels[0, start + 1:start + n] = torch.tensor(row["labels"][1:])
            start += n
        position_ids = torch.cat([torch.arange(n) for n in segments])[None]
        bounds = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(segments)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": (torch.arange(self.budget) < used).long()[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def pack_in_order(order: list[int], lengths: list[int], budget: int, open_batches: int = 16) -> list[list[int]]:
    """Example indices grouped into batches of at most `budget` tokens: first fit over the given (shuffled) order into
    up to `open_batches` batches at once, the oldest closing when another must open. Keeps the shuffle's mix, and
    fills batches better than closing each at the first example that does not fit."""
    batches, closed = [], []
    for index in order:
        n = lengths[index]
        target = next((batch for batch in batches if batch[0] + n <= budget), None)
        if target is None:
            if len(batches) == open_batches:
                closed.append(batches.pop(0)[1])
            target = [0, []]
            batches.append(target)
        target[0] += n
        target[1].append(index)
    return closed + [indices for _, indices in batches]


class PackedBatchSampler(Sampler[list[int]]):
    """Each epoch: a seeded shuffle, packed greedily into batches of at most `budget` tokens, split across ranks (every
    rank gets as many batches), starting `skip` batches in after a mid-epoch resume."""

    def __init__(self, lengths: list[int], budget: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.lengths, self.budget, self.seed = lengths, budget, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = pack_in_order(torch.randperm(len(self.lengths), generator=generator).tolist(), self.lengths, self.budget)
        return batches[self.rank : len(batches) - len(batches) % self.num_replicas : self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self._batches()[skip:]


class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch, split across ranks, that can start mid-epoch.

    Lightning restores the step counters of a mid-epoch checkpoint but replays the epoch's data from its first
    batch; skipping the batches already trained on keeps a resumed run on the data order of an unbroken one.
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[: len(self) * self.num_replicas]
        mine = order[self.rank :: self.num_replicas].tolist()
        skip, self.skip = self.skip, 0
        yield from mine[skip:]


def resume_position(sampler: ResumableSampler | PackedBatchSampler, trainer: pl.Trainer, items_per_batch: int = 1):
    """The sampler set to the trainer's current epoch, past the batches a restored checkpoint already trained on
    (`items_per_batch`: what the sampler yields per batch, indices for ResumableSampler, whole batches for a batch
    sampler)."""
    sampler.set_epoch(trainer.current_epoch)
    sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * items_per_batch
    return sampler


def resumable_sampler(trainer: pl.Trainer, num_samples: int, seed: int, batch_size: int) -> ResumableSampler:
    """This rank's sampler for the trainer's current epoch, past the batches a restored checkpoint already trained on."""
    return resume_position(ResumableSampler(num_samples, seed, trainer.world_size, trainer.global_rank), trainer, batch_size)


class InstructionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: str,
        path: str | None,
        split: str,
        num_examples: int | None,
        format: str,
        prompt_template: str,
        prompt_template_no_input: str,
        max_length: int,
        batch_size: int,
        val_size: float,
        max_val_examples: int | None,
        num_workers: int,
        seed: int,
        cache_dir: str,
        packing: bool = False,
        pack_tokens: int | None = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.path, self.split, self.num_examples = source, path, split, num_examples
        self.format = format
        self.templates = (prompt_template, prompt_template_no_input)
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_size = val_size
        self.max_val_examples = max_val_examples
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.packing = packing
        self.pack_tokens = pack_tokens or batch_size * max_length
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes into the datasets cache that setup() reads.
        self.tokenized()

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        splits = self.tokenized().train_test_split(test_size=self._val_count(), seed=self.seed, shuffle=True)
        self.train, self.val = splits["train"], splits["test"]
        if self.max_val_examples is not None and len(self.val) > self.max_val_examples:
            self.val = self.val.select(range(self.max_val_examples))
        log.info("data: %d train / %d val examples", len(self.train), len(self.val))

    def tokenized(self) -> Dataset:
        rows = load_rows(self.source, self.path, self.split, self.num_examples, self.cache_dir, self.seed)
        fmt = detect_format(rows.column_names) if self.format == "auto" else self.format
        tokenizer, templates, max_length = self.tokenizer, self.templates, self.max_length

        def tokenize(row: dict) -> dict:
            prompt, answer = split_prompt_answer(row, fmt, templates, tokenizer)
            return tokenize_example(prompt, answer, tokenizer, max_length, add_bos=fmt == "alpaca")

        fingerprint = hashlib.sha256(
            json.dumps([rows._fingerprint, tokenizer_fingerprint(tokenizer), fmt, templates, max_length, TOKENIZATION_VERSION]).encode()
        ).hexdigest()[:16]
        tokenized = rows.map(tokenize, remove_columns=rows.column_names, new_fingerprint=fingerprint, desc="tokenizing")
        # A prompt longer than max_length leaves nothing to learn from.
        return tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]),
                                new_fingerprint=f"{fingerprint}-answerable")

    def _val_count(self) -> int | float:
        return int(self.val_size) if self.val_size >= 1 else self.val_size

    def train_dataloader(self) -> DataLoader:
        if self.packing:
            return self._packed_loader()
        return self._loader(self.train, sampler=resumable_sampler(self.trainer, len(self.train), self.seed, self.batch_size))

    def _packed_loader(self) -> DataLoader:
        trainer = self.trainer
        lengths = [len(ids) for ids in self.train["input_ids"]]
        sampler = resume_position(
            PackedBatchSampler(lengths, self.pack_tokens, self.seed, trainer.world_size, trainer.global_rank), trainer)
        return DataLoader(
            self.train.with_format(columns=["input_ids", "labels"]),
            batch_sampler=sampler,
            collate_fn=PackedCollator(self.tokenizer.pad_token_id, self.pack_tokens),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, sampler=None)

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset.with_format(columns=["input_ids", "labels"]),
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=sampler is not None,
            collate_fn=InstructionCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def build_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> pl.LightningDataModule:
    """`data._target_` (tunelab's or the user's own LightningDataModule, tunelab.targets) with the option's keys and
    the tokenizer."""
    return build_target("data", cfg, tokenizer=tokenizer)


class RandomTokenDataModule(pl.LightningDataModule):
    """Fixed-length rows of random token ids, every position a target: a throughput benchmark's data, not a task."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_examples: int, max_length: int, batch_size: int,
                 val_size: int, seed: int, **_ignored: Any):
        super().__init__()
        self.vocab_size = len(tokenizer)
        self.num_examples, self.max_length, self.batch_size = num_examples, max_length, batch_size
        self.val_size, self.seed = int(val_size), seed

    def _rows(self, count: int, offset: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + offset)
        return torch.randint(0, self.vocab_size, (count, self.max_length), generator=generator)

    def _loader(self, rows: torch.Tensor, sampler: Sampler | None) -> DataLoader:
        def collate(indices: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            ids = torch.stack(indices)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        return DataLoader(list(rows), batch_size=self.batch_size, sampler=sampler, drop_last=sampler is not None,
                          collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        sampler = resumable_sampler(self.trainer, self.num_examples, self.seed, self.batch_size)
        return self._loader(self._rows(self.num_examples, 0), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._rows(self.val_size, 1), sampler=None)
