"""A source's raw rows in file order, from a position that can be saved and returned to without reading what came
before it: the byte offset of a JSON-lines file, the row of a parquet file, the state of a `datasets` stream (a Hub
dataset read with `streaming=True`, which resumes from its shard and offset).

Rows come out raw (a JSON line's bytes, a parquet or Hub row's dict): a stream read on several ranks and workers is
read whole by each, and only the rows a reader keeps are parsed and tokenized (tunelab.data.streaming).
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from tunelab.tiny_task import TINY_SOURCES


class BadRow(ValueError):
    """A row that cannot be read as a JSON object: counted and skipped mid-stream (fate `bad`)."""


class RowStream(Protocol):
    def read(self, position: Any) -> "Reading":
        """A reading of the source from `position` (None: its start) to its end."""


class Reading(Protocol):
    def __iter__(self) -> Iterator[Any]:
        """The raw rows."""

    def position(self) -> Any:
        """Where the row after the last one given starts (JSON-able; asked for at block boundaries only)."""


class JsonLinesRows:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def read(self, position: int | None) -> "JsonLinesReading":
        return JsonLinesReading(self.path, position or 0)


class JsonLinesReading:
    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            while line := file.readline():
                self.offset += len(line)
                if line.strip():
                    yield line

    def position(self) -> int:
        return self.offset


class ParquetRows:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def read(self, position: int | None) -> "ParquetReading":
        return ParquetReading(self.path, position or 0)


class ParquetReading:
    def __init__(self, path: Path, row: int):
        self.path, self.row = path, row

    def __iter__(self) -> Iterator[dict]:
        import pyarrow.parquet as pq

        file, first = pq.ParquetFile(self.path), 0
        for group in range(file.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            if first + size > self.row:
                for record in file.read_row_group(group).to_pylist()[self.row - first:]:
                    self.row += 1
                    yield record
            first += size

    def position(self) -> int:
        return self.row


class HubRows:
    """A `datasets` streaming dataset; its position is the dataset's own state_dict (shard and offset in it)."""

    def __init__(self, path: str, split: str, cache_dir: str):
        self.path, self.split, self.cache_dir = path, split, cache_dir

    def read(self, position: dict | None) -> "HubReading":
        from datasets import load_dataset

        rows = load_dataset(self.path, split=self.split, streaming=True, cache_dir=self.cache_dir)
        if position is not None:
            rows.load_state_dict(position)
        return HubReading(rows)


class HubReading:
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def position(self) -> dict:
        return self.rows.state_dict()


def open_source(source: str, path: str | None, split: str, cache_dir: str, seed: int,
                num_examples: int | None) -> RowStream:
    """The row stream of a data option's (or data.sources entry's) source."""
    if source in TINY_SOURCES:
        from tunelab.data.datamodule import tiny_task_file

        return JsonLinesRows(tiny_task_file(cache_dir, num_examples, seed, source))
    if source == "jsonl":
        return ParquetRows(path) if str(path).endswith(".parquet") else JsonLinesRows(path)
    return HubRows(path, split, str(Path(cache_dir) / "datasets"))


def parse_row(raw: Any) -> dict:
    """A raw row as a dict, or BadRow saying why it is not one."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRow(f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise BadRow("not a JSON object")
    return raw
