"""What a run trains on, for a person to read: its first training rows as the model gets them, decoded, with the tokens
it learns (labels != -100) marked; the distribution of the examples' lengths; the mix's shares; with packing, how full
the packed rows are. `python preview.py [overrides]` prints it and exits, before any model loads; every run logs the
same text as its MLflow artifact data_preview.txt (tunelab.dataset_inputs).

A trained span is wrapped in « » (in green too on a terminal), so what is learned shows at a glance: a prompt marked
as trained, an answer left out or a missing end-of-sequence token is visible in the first row.
"""

import numpy as np
import torch

from tunelab.data.collators import InstructionCollator, PackedCollator
from tunelab.data.formats import IGNORE_INDEX
from tunelab.data.checks import STREAM_CHECK_ROWS
from tunelab.data.samplers import PackedBatchSampler, ResumableSampler
from tunelab.data.streaming import STATE_KEY

OPEN, CLOSE = "«", "»"
GREEN, RESET = "\x1b[32m", "\x1b[0m"


def marked_text(input_ids: list[int], labels: list[int], tokenizer, colour: bool = False) -> str:
    """The tokens decoded, each run of trained tokens wrapped in « ». Each run is the difference between decodings of
    the prefixes before and after it, so a tokenizer that joins tokens with spaces (or merges bytes) reads as a whole."""
    bounds = [0] + [i for i in range(1, len(labels)) if (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    bounds.append(len(input_ids))
    decoded = [tokenizer.decode(input_ids[:end], skip_special_tokens=False) for end in bounds]
    pieces = []
    for start, end, before, after in zip(bounds, bounds[1:], decoded, decoded[1:]):
        text = after[len(before):] if after.startswith(before) else tokenizer.decode(input_ids[start:end])
        if labels[start] != IGNORE_INDEX:
            text = f"{GREEN}{OPEN}{text}{CLOSE}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
        pieces.append(text)
    return "".join(pieces)


def first_rows(dm, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` training rows of epoch 0 on one device, collated as the training loader does: one example a
    row (no padding needed), or packed rows of data.pack_tokens."""
    if getattr(dm, "streams", None):  # data.streaming: the first rows of one consumer, the whole stream's
        batches = dm.consumer_factory(batch_size=1)(consumer=0, consumers=1).batches()
        return [{k: v for k, v in next(batches).items() if k != STATE_KEY} for _ in range(count)]
    if dm.packing:
        lengths = [len(ids) for ids in dm.train["input_ids"]]
        batches = list(PackedBatchSampler(lengths, dm.pack_tokens, dm.seed, order=dm.train_order))[:count]
        collate = PackedCollator(dm.tokenizer.pad_token_id, dm.pack_tokens)
    else:
        batches = [[index] for index, _ in zip(ResumableSampler(len(dm.train), dm.seed, order=dm.train_order), range(count))]
        collate = InstructionCollator(dm.tokenizer.pad_token_id)
    rows = dm.train.with_format(columns=["input_ids", "labels"])
    return [collate([rows[index] for index in batch]) for batch in batches]


def row_lines(batch: dict[str, torch.Tensor], tokenizer, colour: bool) -> list[str]:
    """One line per example of the row (a packed row holds several: positions restart at each)."""
    used = int(batch["attention_mask"][0].sum())
    ids, labels = batch["input_ids"][0, :used].tolist(), batch["labels"][0, :used].tolist()
    starts = [0] if "position_ids" not in batch else (batch["position_ids"][0, :used] == 0).nonzero().flatten().tolist()
    return [marked_text(ids[start:end], labels[start:end], tokenizer, colour)
            for start, end in zip(starts, [*starts[1:], used])]


def length_lines(lengths: np.ndarray, trained: int, max_length: int) -> list[str]:
    if not len(lengths):
        return ["lengths: no training rows"]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    lines = [f"lengths (tokens, {len(lengths):,} training rows): min {lengths.min()}  median {p50:.0f}  p90 {p90:.0f}  "
             f"p99 {p99:.0f}  max {lengths.max()}  mean {lengths.mean():.1f}  (data.max_length {max_length})",
             f"trained tokens: {trained / lengths.sum():.1%} of all tokens"]
    width = -(-(lengths.max() - lengths.min() + 1) // 8)  # eight bins at most, of whole tokens
    counts = np.bincount((lengths - lengths.min()) // width)
    for i, n in enumerate(counts):
        low = lengths.min() + i * width
        span = f"{low}-{low + width - 1}" if width > 1 else f"{low}"
        lines.append(f"  {span:>11} {'#' * round(40 * n / counts.max()):<40} {n:,}")
    return lines


def preview_text(dm, rows: int = 4, colour: bool = False) -> str:
    """The preview of a set-up InstructionDataModule."""
    tokenizer = dm.tokenizer
    lines = [f"── first {rows} training rows (« » the trained tokens: labels != -100) ──"]
    for number, batch in enumerate(first_rows(dm, rows), 1):
        examples = row_lines(batch, tokenizer, colour)
        used = int(batch["attention_mask"][0].sum())
        size = f"{len(examples)} examples, {used}/{batch['input_ids'].size(1)} tokens" if dm.packing else f"{used} tokens"
        lines.append(f"row {number} ({size}):")
        lines += [f"  {text}" for text in examples]
    if getattr(dm, "streams", None):
        return "\n".join(lines + ["", *stream_lines(dm)]) + "\n"
    lengths = np.array([len(ids) for ids in dm.train["input_ids"]])
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in dm.train["labels"])
    lines += ["", *length_lines(lengths, trained, dm.max_length)]
    if dm.train_order is not None:
        total = sum(dm.train_order.counts)
        lines.append("mix per epoch: " + ", ".join(f"{source.name} {count:,} rows ({count / total:.0%}, weight {source.weight:g})"
                                                     for source, count in zip(dm.sources, dm.train_order.counts)))
    if dm.packing:
        batches = list(PackedBatchSampler(lengths.tolist(), dm.pack_tokens, dm.seed, order=dm.train_order))
        fill = sum(lengths[batch].sum() for batch in batches) / (len(batches) * dm.pack_tokens)
        lines.append(f"packing: {len(batches):,} rows of {dm.pack_tokens} tokens an epoch, {fill:.1%} full "
                     f"({len(lengths) / len(batches):.1f} examples a row)")
    return "\n".join(lines) + "\n"


def stream_lines(dm, rows: int = STREAM_CHECK_ROWS) -> list[str]:
    """A stream's statistics over its first `rows` training examples, and how its mix and packing stand."""
    consumer = dm.consumer_factory(batch_size=1)(consumer=0, consumers=1)
    examples = [example for example, _ in zip(consumer.examples(), range(rows))]
    lengths = np.array([len(example["input_ids"]) for example in examples])
    trained = sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples)
    lines = [f"streamed: the first {len(examples):,} training examples", *length_lines(lengths, trained, dm.max_length)]
    if len(dm.sources) > 1:
        total = sum(consumer.schedule.counts)
        lines.append("mix in every window of 100 rows: " + ", ".join(
            f"{source.name} {count} ({count / total:.0%}, weight {source.weight:g})"
            for source, count in zip(dm.sources, consumer.schedule.counts)))
    if dm.packing:
        packed = dm.consumer_factory()(consumer=0, consumers=1).batches()
        used = [int(next(packed)["attention_mask"].sum()) for _ in range(max(len(examples) // 8, 1))]
        lines.append(f"packing: rows of {dm.pack_tokens} tokens, {sum(used) / (len(used) * dm.pack_tokens):.1%} full over "
                     f"the first {len(used):,}")
    return lines
