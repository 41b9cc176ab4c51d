"""Builds the `data` group: rows from the embedded task, a local JSON-lines file or the hub, tokenized and cached,
split into train and validation, and served in resumable batches."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from datasets import Dataset, concatenate_datasets, load_dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from tunelab.data.collators import InstructionCollator, PackedCollator
from tunelab.data.mixing import MixedOrder, Source, SourceCollator, mix_sources, source_batches
from tunelab.data.formats import TOKENIZATION_VERSION, detect_format, tokenizer_fingerprint
from tunelab.data.rows import RowTokenizer, count_fates, is_trained, report_rows
from tunelab.data.samplers import PackedBatchSampler, resumable_sampler, resume_position
from tunelab.tiny_task import TINY_SOURCES, write_tiny_task

log = logging.getLogger(__name__)


def tiny_task_file(cache_dir: str, num_examples: int, seed: int, source: str = "tiny") -> Path:
    """The rows of an embedded task (data.source: tiny, tiny_chat or tiny_flawed, tunelab.tiny_task) as a JSON-lines
    file, written once per (size, seed) under the cache."""
    return write_tiny_task(Path(cache_dir) / "tiny_task", num_examples, seed, source)


def load_rows(source: str, path: str | None, split: str, num_examples: int | None, cache_dir: str, seed: int) -> Dataset:
    datasets_cache = str(Path(cache_dir) / "datasets")
    if source in TINY_SOURCES:
        path = str(tiny_task_file(cache_dir, num_examples, seed, source))
        source = "jsonl"
    if source == "jsonl":
        builder = "parquet" if str(path).endswith(".parquet") else "json"
        rows = load_dataset(builder, data_files=path, split="train", cache_dir=datasets_cache)
    else:
        rows = load_dataset(path, split=split, cache_dir=datasets_cache)
    if num_examples is not None and len(rows) > num_examples:
        rows = rows.select(range(num_examples))
    return rows


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
        train_on: str = "all_assistant",
        truncation: str = "cut_turns",
        sources: list | None = None,
        streaming: bool = False,  # where true, build_datamodule builds tunelab.data.stream_datamodule's module
        shuffle_block: int | None = None,  # data.streaming's shuffle (tunelab.data.streaming)
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
        self.train_on, self.truncation = train_on, truncation
        self.resolved_format: str | None = None
        self.row_fates: dict[str, int] | None = None
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        # data.sources, or this option's own source; a mix's training order and its sources' split sizes (setup)
        self.sources = mix_sources(sources, source=source, path=path, split=split, format=format, num_examples=num_examples)
        self.train_order: MixedOrder | None = None
        self.source_splits: list[tuple[Dataset, Dataset]] = []  # a mix's (train, val) of each source

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and tokenizes into the datasets cache that setup() reads.
        for source in self.sources:
            self.tokenized(source)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if len(self.sources) > 1:
            return self._setup_mix()
        splits = self.tokenized().train_test_split(test_size=self._val_count(), seed=self.seed, shuffle=True)
        self.train, self.val = splits["train"], splits["test"]
        if self.max_val_examples is not None and len(self.val) > self.max_val_examples:
            self.val = self.val.select(range(self.max_val_examples))
        log.info("data: %d train / %d val examples", len(self.train), len(self.val))
        template = self.tokenizer.get_chat_template() if self.resolved_format == "chat" else None
        report_rows(self.row_fates, self.max_length, self.truncation, self.trainer, template)

    def _setup_mix(self) -> None:
        """Each source split on its own (val_size and max_val_examples per source), then the splits concatenated in
        the order of data.sources; validation rows keep their source's index (`source`)."""
        trains, vals = [], []
        for index, source in enumerate(self.sources):
            splits = self.tokenized(source).train_test_split(test_size=self._val_count(), seed=self.seed, shuffle=True)
            val = splits["test"]
            if self.max_val_examples is not None and len(val) > self.max_val_examples:
                val = val.select(range(self.max_val_examples))
            trains.append(splits["train"])
            vals.append(val.add_column("source", [index] * len(val)))
            template = self.tokenizer.get_chat_template() if self.resolved_format == "chat" else None
            report_rows(self.row_fates, self.max_length, self.truncation, self.trainer, template)
        self.train, self.val = concatenate_datasets(trains), concatenate_datasets(vals)
        self.source_splits = list(zip(trains, vals))
        sizes = [len(rows) for rows in trains]
        self.train_order = MixedOrder(sizes, [source.weight for source in self.sources], self.seed)
        log.info("data: %d train / %d val examples from %d sources; each epoch draws %s", len(self.train), len(self.val),
                 len(self.sources), ", ".join(f"{count} {source.name} ({count / max(size, 1):.2g}x its rows)"
                                              for source, count, size in zip(self.sources, self.train_order.counts, sizes)))

    def tokenized(self, source: Source | None = None) -> Dataset:
        source = source or self.sources[0]
        rows = load_rows(source.source, source.path, source.split, source.num_examples, self.cache_dir, self.seed)
        fmt = detect_format(rows.column_names) if source.format == "auto" else source.format
        self.resolved_format = fmt
        tokenize = RowTokenizer(fmt, self.templates, self.tokenizer, self.max_length, self.train_on, self.truncation)
        fingerprint = hashlib.sha256(json.dumps([
            rows._fingerprint, tokenizer_fingerprint(self.tokenizer), fmt, self.templates, self.max_length,
            self.train_on, self.truncation, TOKENIZATION_VERSION]).encode()).hexdigest()[:16]
        tokenized = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, new_fingerprint=fingerprint,
                             desc="tokenizing")
        self.row_fates = count_fates(tokenized["fate"])
        # Rows too long to fit, or with no assistant turn, leave nothing to learn from.
        return tokenized.filter(is_trained, new_fingerprint=f"{fingerprint}-trained").remove_columns("fate")

    def _val_count(self) -> int | float:
        return int(self.val_size) if self.val_size >= 1 else self.val_size

    def train_dataloader(self) -> DataLoader:
        if self.packing:
            return self._packed_loader()
        sampler = resumable_sampler(self.trainer, len(self.train), self.seed, self.batch_size, self.train_order)
        return self._loader(self.train, sampler=sampler)

    def _packed_loader(self) -> DataLoader:
        trainer = self.trainer
        lengths = [len(ids) for ids in self.train["input_ids"]]
        sampler = resume_position(
            PackedBatchSampler(lengths, self.pack_tokens, self.seed, trainer.world_size, trainer.global_rank,
                               self.train_order), trainer)
        return DataLoader(
            self.train.with_format(columns=["input_ids", "labels"]),
            batch_sampler=sampler,
            collate_fn=PackedCollator(self.tokenizer.pad_token_id, self.pack_tokens),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if len(self.sources) > 1:  # batches of one source each, named, for val/loss/<name> (CausalLMModule)
            return DataLoader(
                self.val.with_format(columns=["input_ids", "labels", "source"]),
                batch_sampler=source_batches([len(val) for _, val in self.source_splits], self.batch_size),
                collate_fn=SourceCollator(InstructionCollator(self.tokenizer.pad_token_id), [s.name for s in self.sources]),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
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
