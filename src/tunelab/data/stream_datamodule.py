"""The datamodule of data.streaming=true (tunelab.data.streaming holds the order and the batches).

Validation holds out the first rows of each source: data.max_val_examples of them (data.val_size where it is a count
of rows), read and tokenized at setup; a stream has no length to take a fraction of, and its first rows are known
without reading the rest. Training rows start past them, so no row is both.

What a checkpoint holds: for every rank, how many batches it trained on and the state of each of its consumers after
its last batch (SourceCursor's block and row in it, the mixed stream's position, the packing carry, the row fates). A
resume needs the same number of ranks and workers: each consumer restarts from its own state.
"""

import functools
import logging
from typing import Any

import torch.distributed as dist
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader

from tunelab.data.checks import STREAM_CHECK_ROWS
from tunelab.data.datamodule import InstructionDataModule
from tunelab.data.formats import detect_format
from tunelab.data.rows import RowTokenizer, is_trained
from tunelab.data.streaming import STATE_KEY, STREAM_FATES, StreamConsumer, StreamDataset
from tunelab.data.streams import BadRow, open_source, parse_row

log = logging.getLogger(__name__)


class StreamingDataModule(InstructionDataModule):
    def __init__(self, *args, shuffle_block: int = 10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.shuffle_block = shuffle_block or 10000
        self.streams, self.formats, self.train_starts = [], [], []
        self.batches_served = 0
        self.consumer_states: dict[int, dict] = {}

    def prepare_data(self) -> None:
        pass  # nothing is downloaded or cached ahead

    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return
        held_out = int(self.val_size) if self.val_size >= 1 else (self.max_val_examples or 500)
        vals = []
        for index, source in enumerate(self.sources):
            stream = open_source(source.source, source.path, source.split, self.cache_dir, self.seed, source.num_examples)
            fmt = source.format if source.format != "auto" else stream_format(stream)
            reading, rows = stream.read(None), []
            for raw in reading:
                rows.append(raw)
                if len(rows) == held_out:
                    break
            tokenize = self.row_tokenizer(fmt)
            val = [example for example in map(functools.partial(tokenized, tokenize), rows) if example is not None]
            vals.append(Dataset.from_list(val).add_column("source", [index] * len(val)))
            self.streams.append(stream)
            self.formats.append(fmt)
            self.train_starts.append(reading.position())
        self.resolved_format = self.formats[0]
        self.val = vals[0] if len(vals) == 1 else concatenate_datasets(vals)
        self.source_splits = [(None, val) for val in vals]
        log.info("data: streaming %d source%s (%s); validation: the first %d rows of each (%d examples)",
                 len(self.sources), "s" if len(self.sources) > 1 else "", ", ".join(s.name for s in self.sources),
                 held_out, len(self.val))

    def row_tokenizer(self, fmt: str) -> RowTokenizer:
        return RowTokenizer(fmt, self.templates, self.tokenizer, self.max_length, self.train_on, self.truncation)

    def consumer_factory(self, batch_size: int | None = None):
        """StreamConsumer with this module's sources and batching, but for the consumer's place and state."""
        return functools.partial(
            StreamConsumer, self.streams, [s.weight for s in self.sources], self.train_starts,
            [self.row_tokenizer(fmt) for fmt in self.formats], self.formats, seed=self.seed,
            block_size=self.shuffle_block, batch_size=batch_size or self.batch_size,
            pad_token_id=self.tokenizer.pad_token_id, pack_tokens=self.pack_tokens if self.packing else None)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        make_consumer = self.consumer_factory()
        dataset = StreamDataset(functools.partial(_consumer, make_consumer), trainer.global_rank, trainer.world_size,
                                self.num_workers, self.batches_served, self.consumer_states)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if len(self.sources) == 1:
            return self._loader(self.val, sampler=None)
        return super().val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and STATE_KEY in batch:
            state = batch.pop(STATE_KEY)
            self.consumer_states[state.pop("worker")] = state
            self.batches_served += 1
        return batch

    def state_dict(self) -> dict:
        mine = {"batches": self.batches_served, "consumers": self.consumer_states}
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        self._log_fates(ranks)
        return {"workers": max(self.num_workers, 1), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        ranks, workers = state["ranks"], max(self.num_workers, 1)
        if (len(ranks), state["workers"]) != (self.trainer.world_size, workers):
            raise ValueError(f"this checkpoint's data stream was read by {len(ranks)} rank(s) of {state['workers']} "
                             f"worker(s) each; resume it with as many (now {self.trainer.world_size} and {workers}): "
                             "each reader continues from its own place in the stream")
        mine = ranks[self.trainer.global_rank]
        self.batches_served = mine["batches"]
        self.consumer_states = {int(worker): consumer for worker, consumer in mine["consumers"].items()}

    def _log_fates(self, ranks: list[dict]) -> None:
        logger = self.trainer.logger if self.trainer is not None and self.trainer.is_global_zero else None
        if logger is None:
            return
        totals = {fate: sum(state["fates"][fate] for rank in ranks for state in rank["consumers"].values())
                  for fate in STREAM_FATES}
        logger.log_metrics({f"data/rows_{fate}": float(count) for fate, count in totals.items()},
                           step=self.trainer.global_step)


def _consumer(make_consumer, consumer: int, consumers: int, state: dict | None) -> StreamConsumer:
    return make_consumer(consumer=consumer, consumers=consumers, state=state)


def stream_format(stream) -> str:
    """alpaca or chat, from the fields of the stream's first rows (the rows that cannot be read are left to the checks)."""
    columns = set()
    for count, raw in enumerate(stream.read(None)):
        if count == STREAM_CHECK_ROWS:
            break
        try:
            columns |= parse_row(raw).keys()
        except BadRow:
            continue
    return detect_format(sorted(columns))


def tokenized(tokenize: RowTokenizer, raw: Any) -> dict | None:
    try:
        example = tokenize(parse_row(raw))
    except (BadRow, ValueError):
        return None
    return {"input_ids": example["input_ids"], "labels": example["labels"]} if is_trained(example) else None
