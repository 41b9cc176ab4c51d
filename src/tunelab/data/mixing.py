"""Training on several datasets at once (`data.sources`), each drawn in proportion to its weight.

An epoch holds as many rows as all sources' training splits together, each source's share set by its weight (largest
remainders, so the shares are exact to a row). A source gives its rows in a seeded shuffle and starts a new shuffle
once it has given them all: a small source with a large weight repeats, a large one with a small weight gives other
rows in each epoch. The epoch's rows are then shuffled together. Every index is a pure function of (seed, epoch), the
same property that makes ResumableSampler and PackedBatchSampler resume mid-epoch exactly, and they take this order in
place of their own shuffle: packing and DDP work over mixed sources unchanged.

`datasets.interleave_datasets(probabilities=...)` was the other way: it draws each row's source at random, so an epoch's
shares wander by about sqrt(n) rows, and a mid-epoch resume would have to replay the draws of the rows before it.

Each source keeps its own validation split; validation batches never mix sources, and each carries its source's name,
so the module logs `val/loss/<name>` beside `val/loss`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tunelab.config.data import entry_source


@dataclass(frozen=True)
class Source:
    """One entry of data.sources (tunelab.config.data.check_sources holds each key to its type first)."""

    name: str
    source: str  # jsonl | hub | tiny (like data.source)
    path: str | None
    split: str
    format: str
    num_examples: int | None
    weight: float


def mix_sources(sources: Sequence | None, *, source: str, path: str | None, split: str, format: str,
                num_examples: int | None) -> list[Source]:
    """data.sources as Source entries, their split and num_examples taken from the data option where unset, their
    format told from their columns (auto); or the data option's own source (weight 1) where there is no list."""
    if not sources:
        return [Source(source_name(source, path), source, path, split, format, num_examples, 1.0)]
    return [Source(name=entry["name"], source=entry_source(entry), path=entry.get("path"),
                   split=entry.get("split") or split, format=entry.get("format") or "auto",
                   num_examples=entry.get("num_examples", num_examples), weight=float(entry.get("weight", 1.0)))
            for entry in sources]


def source_name(source: str, path: str | None) -> str:
    """What a single source is called in MLflow: the Hub id, the file's name, or the embedded task's."""
    if source == "hub":
        return str(path)
    if source == "jsonl":
        return str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return "tiny-task"


def epoch_counts(weights: Sequence[float], total: int) -> list[int]:
    """Rows of each source in an epoch of `total` rows: the weights' shares, rounded by largest remainder."""
    shares = np.asarray(weights, dtype=float) / sum(weights) * total
    counts = np.floor(shares).astype(int)
    by_remainder = np.argsort(-(shares - counts), kind="stable")
    counts[by_remainder[: total - counts.sum()]] += 1
    return counts.tolist()


class MixedOrder:
    """epoch → indices into the sources' training rows concatenated in order (`sizes`), `len(self)` of them, drawn in
    proportion to `weights`."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes, self.seed = list(sizes), seed
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.counts = epoch_counts(weights, sum(self.sizes))

    def __len__(self) -> int:
        return sum(self.counts)

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        """Rows start .. start+count of the source's endless stream: one seeded shuffle of its rows after another."""
        size, rows, position = self.sizes[source], [], start
        while position < start + count:
            shuffle = np.random.default_rng([self.seed, source, position // size]).permutation(size)
            taken = shuffle[position % size : position % size + start + count - position]
            rows.append(taken)
            position += len(taken)
        return np.concatenate(rows) + self.offsets[source] if rows else np.zeros(0, dtype=int)

    def __call__(self, epoch: int) -> list[int]:
        drawn = np.concatenate([self._stream(i, epoch * count, count) for i, count in enumerate(self.counts)])
        return drawn[np.random.default_rng([self.seed, epoch]).permutation(len(drawn))].tolist()


def source_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Validation batches over the sources' rows concatenated in order, none holding rows of two sources."""
    batches, start = [], 0
    for size in sizes:
        batches += [list(range(i, min(i + batch_size, start + size))) for i in range(start, start + size, batch_size)]
        start += size
    return batches


class SourceCollator:
    """A collator's batch with the name of the source its rows come from (`source`, a column of the rows)."""

    def __init__(self, collate: Callable[[list[dict]], dict], names: Sequence[str]):
        self.collate, self.names = collate, list(names)

    def __call__(self, rows: list[dict]) -> dict:
        return {**self.collate(rows), "source": self.names[rows[0]["source"]]}
