"""data.streaming=true, below the Trainer: the order of shuffled blocks, the windowed mix, the consumers of ranks and
workers, and a consumer resumed from its state (tunelab/data/streaming.py, streams.py)."""

import json
from pathlib import Path

import pytest

from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data.rows import RowTokenizer
from tunelab.data.streaming import MIX_WINDOW, STATE_KEY, MixSchedule, SourceCursor, StreamConsumer
from tunelab.data.streams import JsonLinesRows, ParquetRows

TEMPLATES = ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
             "### Instruction:\n{instruction}\n\n### Response:\n")


def write_rows(path: Path, count: int, tag: str = "r", bad_every: int | None = None) -> Path:
    with path.open("w") as file:
        for i in range(count):
            if bad_every and i % bad_every == bad_every - 1:
                file.write("{not json\n")
                continue
            file.write(json.dumps({"instruction": f"{tag}{i}", "output": "x" * (1 + i % 7)}) + "\n")
    return path


def consumer(paths: list[Path], index: int, count: int, *, weights=None, state=None, block=16, packed=False,
             skip_rows=0) -> StreamConsumer:
    tokenizer = build_char_tokenizer()
    streams = [JsonLinesRows(p) for p in paths]
    starts = [held_out_end(s, skip_rows) for s in streams]
    tokenize = RowTokenizer("alpaca", TEMPLATES, tokenizer, 128, "all_assistant", "cut_turns")
    return StreamConsumer(streams, weights or [1.0] * len(paths), starts, [tokenize] * len(paths), ["alpaca"] * len(paths),
                          consumer=index, consumers=count, seed=7, block_size=block, batch_size=4,
                          pad_token_id=tokenizer.pad_token_id, pack_tokens=200 if packed else None, state=state)


def held_out_end(stream, rows: int):
    reading = stream.read(None)
    for count, _ in enumerate(reading, 1):
        if count == rows:
            break
    return reading.position() if rows else None


def instructions(consumer: StreamConsumer, rows: int) -> list[str]:
    return [json.loads(consumer._row()[1])["instruction"] for _ in range(rows)]


def test_one_pass_over_two_ranks_of_two_workers_gives_every_row_to_one_consumer(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 103)
    seen = []
    for index in range(4):
        reader = consumer([path], index, 4)
        seen += instructions(reader, len(range(index, 103, 4)))
        assert all(cursor.passes == 0 for cursor in reader.cursors)
    assert sorted(seen) == sorted(f"r{i}" for i in range(103))
    assert seen[:26] != [f"r{i}" for i in range(0, 103, 4)]  # shuffled, not file order


def test_the_shuffle_is_of_blocks_and_a_new_pass_draws_another_order(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 40)
    cursor = SourceCursor(JsonLinesRows(path), 0, seed=3, block_size=10, train_start=None)
    first, second = [json.loads(cursor.take())["instruction"] for _ in range(40)], [json.loads(cursor.take())["instruction"] for _ in range(40)]
    for block in range(4):
        assert sorted(first[block * 10:(block + 1) * 10]) == sorted(f"r{i}" for i in range(block * 10, block * 10 + 10))
    assert sorted(second) == sorted(first) and second != first


def test_held_out_rows_are_never_trained_on(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 50)
    reader = consumer([path], 0, 1, skip_rows=10)
    trained = set(instructions(reader, 120))  # almost three passes
    assert trained == {f"r{i}" for i in range(10, 50)}


def test_each_window_of_the_mix_holds_the_weights_shares_exactly():
    schedule = MixSchedule([3.0, 1.0], seed=1)
    for window in range(3):
        sources = [schedule[window * MIX_WINDOW + i][0] for i in range(MIX_WINDOW)]
        assert sources.count(0) == 75 and sources.count(1) == 25
    assert [schedule[i][1] for i in range(200) if schedule[i][0] == 1] == list(range(50))  # each source in order


@pytest.mark.parametrize("packed", [False, True])
def test_a_consumer_resumed_from_its_state_continues_as_the_unbroken_one(tmp_path, packed):
    """Two sources mixed 3:1, consumer 1 of 2, blocks of 16 rows: the state after 5 batches (mid-block, a packing
    carry pending) gives the next batches of the straight consumer."""
    paths = [write_rows(tmp_path / "a.jsonl", 90, "a"), write_rows(tmp_path / "b.jsonl", 30, "b")]
    straight = consumer(paths, 1, 2, weights=[3, 1], packed=packed).batches()
    states = [next(straight)[STATE_KEY] for _ in range(5)]
    expected = [next(straight) for _ in range(12)]  # past the end of b: a second pass of it
    state = json.loads(json.dumps(states[-1]))  # as a checkpoint holds it
    if packed:
        assert state["carry"] is not None
    assert any(0 < cursor["taken"] < 16 for cursor in state["cursors"])
    resumed = consumer(paths, 1, 2, weights=[3, 1], packed=packed, state=state).batches()
    for want in expected:
        got = next(resumed)
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["labels"].tolist() == want["labels"].tolist()


def test_bad_rows_in_the_stream_are_counted_and_skipped(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 60, bad_every=20)
    reader = consumer([path], 0, 1)
    examples = reader.examples()
    while sum(reader.fates.values()) < 60:  # one pass
        next(examples)
    assert reader.fates["bad"] == 3 and reader.fates["kept"] == 57


def test_a_parquet_file_reads_from_a_saved_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"p{i}", "output": "y"} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=10)
    reading = ParquetRows(tmp_path / "rows.parquet").read(None)
    first = [row for _, row in zip(range(13), reading)]
    rest = list(ParquetRows(tmp_path / "rows.parquet").read(reading.position()))
    assert [r["instruction"] for r in first + rest] == [f"p{i}" for i in range(25)]


def test_a_hub_dataset_streams_from_its_saved_state(tmp_path):
    """data.source=hub with streaming: `datasets`' own stream (here over a local dataset directory, as no hub is
    reachable), resumed from its state_dict mid-file."""
    from tunelab.data.streams import HubRows

    directory = tmp_path / "dataset"
    directory.mkdir()
    write_rows(directory / "train.jsonl", 30, "h")
    reading = HubRows(str(directory), "train", str(tmp_path / "cache")).read(None)
    first = [row for _, row in zip(range(11), reading)]
    rest = list(HubRows(str(directory), "train", str(tmp_path / "cache")).read(reading.position()))
    assert [r["instruction"] for r in first + rest] == [f"h{i}" for i in range(30)]


def test_a_streamed_run_previews_its_first_rows_and_names_its_inputs(tmp_path, dataset_cache):
    """preview.py and the run's data_preview.txt read a stream's first rows; its MLflow inputs are each source's
    stream (no row count) and its held-out first rows."""
    from tests.conftest import compose_config
    from tunelab.data import build_datamodule
    from tunelab.data.preview import preview_text
    from tunelab.dataset_inputs import dataset_inputs

    cfg = compose_config(["data.streaming=true", "data.packing=true", "data.pack_tokens=96", "data.max_val_examples=20"],
                         tmp_path, dataset_cache)
    dm = build_datamodule(cfg.data, build_char_tokenizer())
    dm.setup("fit")
    text = preview_text(dm, rows=2)
    assert "row 2 (" in text and "streamed: the first 1,000 training examples" in text and "% full over" in text
    inputs = {(i.dataset.name, i.tags[0].value): json.loads(i.dataset.profile) for i in dataset_inputs(dm)}
    assert inputs == {("tiny-task", "training"): {"num_rows": 0, "streaming": True, "weight": 1.0},
                      ("tiny-task", "validation"): {"num_rows": 20, "streaming": True, "weight": 1.0}}
