"""data.streaming=true: rows read, tokenized and batched as training consumes them, never cached whole.

The order of one run is a pure function of the seed, whatever the ranks and dataloader workers:

- **Shuffled blocks** (`SourceCursor`): each source is read in blocks of data.shuffle_block rows, each block permuted
  by (seed, source, pass, block). A shuffle buffer mixes rows further apart, but its order depends on every draw before
  it; a block's order depends on the block's start alone, so a resume re-reads one block per source (at most
  shuffle_block raw rows) instead of replaying the stream, and what "sat in the buffer" is exactly the block's rest.
  A source read to its end starts a new pass with other permutations; its first rows (the held-out validation rows)
  are never trained on.
- **Windowed mixing** (`MixSchedule`): the mixed stream is cut into windows of MIX_WINDOW rows; each window holds each
  source's weight share to a row (largest remainders), in a seeded order. Exact shares over every window, as the
  cached mix is exact over an epoch, and the source of position p is known without drawing the p before it.
- **Consumers** (`StreamConsumer`): with R ranks of W workers there are N = R x W consumers; consumer c takes the mixed
  stream's positions c, c + N, c + 2N, ... Each row goes to exactly one consumer; each consumer reads every source
  whole (raw bytes, cheap) and parses and tokenizes only its own rows.
- **Batches**: batch_size examples padded, or packed next-fit into rows of pack_tokens (an example that does not fit
  opens the next pack and is carried into the state). Each batch carries its consumer's state after it (`STATE_KEY`);
  the datamodule keeps the latest state of each consumer it trained on and checkpoints them all (StreamingDataModule).
"""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from jinja2 import TemplateError
from torch.utils.data import IterableDataset, get_worker_info

from tunelab.data.collators import InstructionCollator, PackedCollator
from tunelab.data.rows import FATES, RowTokenizer, is_trained
from tunelab.data.streams import BadRow, RowStream, parse_row
from tunelab.data.checks import row_problem

log = logging.getLogger(__name__)

MIX_WINDOW = 100
STATE_KEY = "stream_state"
STREAM_FATES = (*FATES, "bad")  # bad: not a JSON object, or not a row of the format


class SourceCursor:
    """One source's training rows, endless: pass after pass over the rows past its first `skip`, in shuffled blocks.

    State: the pass, the block's number and start position, and how many of its rows were taken."""

    def __init__(self, stream: RowStream, index: int, seed: int, block_size: int, train_start: Any,
                 state: dict | None = None):
        self.stream, self.index, self.seed, self.block_size = stream, index, seed, block_size
        self.train_start = train_start  # the position past the held-out validation rows
        state = state or {"pass": 0, "block": 0, "start": train_start, "taken": 0}
        self.passes, self.block_index, self.start, self.taken = state["pass"], state["block"], state["start"], state["taken"]
        self.block: list | None = None
        self.reading = None  # the stream's reading in progress, and its rows
        self.rows = None
        self.next_start = None

    def state(self) -> dict:
        return {"pass": self.passes, "block": self.block_index, "start": self.start, "taken": self.taken}

    def _fill(self) -> None:
        """The block at `start`, permuted; past the source's end, the next pass's first block."""
        for _ in range(2):
            if self.reading is None:
                self.reading = self.stream.read(self.start)
                self.rows = iter(self.reading)
            rows = []
            for raw in self.rows:
                rows.append(raw)
                if len(rows) == self.block_size:
                    break
            if rows:
                order = np.random.default_rng([self.seed, self.index, self.passes, self.block_index]).permutation(len(rows))
                self.block = [rows[i] for i in order]
                self.next_start = self.reading.position() if len(rows) == self.block_size else None
                return
            self.passes, self.block_index, self.start, self.taken = self.passes + 1, 0, self.train_start, 0
            self.reading = None
        raise ValueError(f"data source {self.index} has no training rows past its held-out validation rows")

    def take(self) -> Any:
        """The next raw row."""
        if self.block is None:
            self._fill()
        if self.taken == len(self.block):
            self.block_index, self.taken = self.block_index + 1, 0
            if self.next_start is None:  # the block ended the source: the next pass starts over
                self.passes, self.block_index, self.start, self.reading = self.passes + 1, 0, self.train_start, None
            else:
                self.start = self.next_start
            self._fill()
        row = self.block[self.taken]
        self.taken += 1
        return row


class MixSchedule:
    """Position p of the mixed stream → (source, how many rows of that source come before p)."""

    def __init__(self, weights: Sequence[float], seed: int):
        from tunelab.data.mixing import epoch_counts

        self.counts = epoch_counts(weights, MIX_WINDOW)
        self.seed = seed
        self._window, self._order = -1, np.zeros(0, dtype=int)

    def _window_order(self, window: int) -> np.ndarray:
        if window != self._window:
            sources = np.repeat(np.arange(len(self.counts)), self.counts)
            self._window, self._order = window, sources[np.random.default_rng([self.seed, window]).permutation(MIX_WINDOW)]
        return self._order

    def __getitem__(self, position: int) -> tuple[int, int]:
        window, offset = divmod(position, MIX_WINDOW)
        order = self._window_order(window)
        source = int(order[offset])
        return source, window * self.counts[source] + int((order[:offset] == source).sum())


class StreamConsumer:
    """Consumer `consumer` of `consumers`: its rows of the mixed stream, tokenized, in batches; resumable from a state."""

    def __init__(self, streams: Sequence[RowStream], weights: Sequence[float], train_starts: Sequence[Any],
                 tokenizers: Sequence[RowTokenizer], formats: Sequence[str], *, consumer: int, consumers: int,
                 seed: int, block_size: int, batch_size: int, pad_token_id: int, pack_tokens: int | None,
                 state: dict | None = None):
        state = state or {}
        self.consumer, self.consumers = consumer, consumers
        self.cursors = [SourceCursor(stream, i, seed, block_size, start, (state.get("cursors") or [None] * len(streams))[i])
                        for i, (stream, start) in enumerate(zip(streams, train_starts))]
        self.schedule = MixSchedule(weights, seed)
        self.tokenizers, self.formats = tokenizers, formats
        self.position = state.get("position", consumer)  # the next position of the mixed stream this consumer takes
        self.read = state.get("read", [0] * len(streams))  # rows of each source read so far (own and others')
        self.fates = state.get("fates", {fate: 0 for fate in STREAM_FATES})
        self.carry = state.get("carry")  # packing: the example that opens the next pack
        self.batch_size, self.pack_tokens = batch_size, pack_tokens
        self.collate = PackedCollator(pad_token_id, pack_tokens) if pack_tokens else InstructionCollator(pad_token_id)

    def state(self) -> dict:
        return {"position": self.position, "read": list(self.read), "cursors": [c.state() for c in self.cursors],
                "fates": dict(self.fates), "carry": self.carry}

    def _row(self) -> tuple[int, Any]:
        """The next raw row of this consumer, and its source."""
        source, rank_in_source = self.schedule[self.position]
        self.position += self.consumers
        cursor = self.cursors[source]
        while self.read[source] < rank_in_source:  # rows of other consumers
            cursor.take()
            self.read[source] += 1
        self.read[source] += 1
        return source, cursor.take()

    def examples(self) -> Iterator[dict]:
        """This consumer's trained examples; each row's fate counted."""
        while True:
            source, raw = self._row()
            try:
                row = parse_row(raw)
                if problem := row_problem(row, self.formats[source]):
                    raise BadRow(problem)
                example = self.tokenizers[source](row)
            except (BadRow, ValueError, TemplateError) as error:  # a chat template may refuse a row too
                self.fates["bad"] += 1
                if self.fates["bad"] <= 3:
                    log.warning("data: a row of source %d skipped (%s)", source, error)
                continue
            self.fates[example["fate"]] += 1
            if is_trained(example):
                yield {"input_ids": example["input_ids"], "labels": example["labels"]}

    def batches(self) -> Iterator[dict]:
        examples = self.examples()
        while True:
            rows = []
            if self.pack_tokens:
                used = 0
                if self.carry is not None:
                    rows, used, self.carry = [self.carry], len(self.carry["input_ids"]), None
                for example in examples:
                    size = len(example["input_ids"])
                    if used + size > self.pack_tokens:
                        self.carry = example
                        break
                    rows.append(example)
                    used += size
            else:
                for example in examples:
                    rows.append(example)
                    if len(rows) == self.batch_size:
                        break
            yield {**self.collate(rows), STATE_KEY: self.state()}


class StreamDataset(IterableDataset):
    """This rank's consumers: one per dataloader worker (or one in the main process), resumed from `states`
    (logical consumer → state). After n batches of a rank, its next batch is logical worker n mod W's; the dataloader
    asks worker 0 first, so physical worker w plays logical worker (w + n) mod W."""

    def __init__(self, make_consumer, rank: int, world_size: int, workers: int, batches_served: int,
                 states: dict[int, dict]):
        self.make_consumer, self.rank, self.world_size = make_consumer, rank, world_size
        self.workers, self.batches_served, self.states = max(workers, 1), batches_served, states

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.batches_served) % self.workers
        consumer = self.rank * self.workers + logical
        stream = self.make_consumer(consumer, self.world_size * self.workers, self.states.get(logical))
        for batch in stream.batches():
            batch[STATE_KEY] = {"worker": logical, **batch[STATE_KEY]}
            yield batch
