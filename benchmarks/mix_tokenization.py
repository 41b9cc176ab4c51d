"""What mixing costs the data pass: the same rows tokenized and split as one JSON-lines source, and as two sources
mixed 3:1 (data.sources), each from an empty cache, on the CPU; rows per second of prepare_data + setup, best of
--repeats (interleaved). `python benchmarks/mix_tokenization.py --rows 20000` (BENCHMARKS.md, data mixing)."""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data import InstructionDataModule
from tunelab.tiny_task import make_example


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def data_pass(directory: Path, sources: list | None, path: str | None) -> float:
    """Seconds for tokenizing and splitting into a fresh cache."""
    dm = InstructionDataModule(build_char_tokenizer(), source="jsonl", path=path, split="train", num_examples=None,
                               format="auto", prompt_template="{instruction} {input}=", prompt_template_no_input="{instruction}=",
                               max_length=48, batch_size=32, val_size=0.05, max_val_examples=200, num_workers=0, seed=1234,
                               cache_dir=tempfile.mkdtemp(dir=directory), sources=sources)
    started = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    rows = [make_example(rng) for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        whole = write_rows(directory / "all.jsonl", rows)
        half = args.rows // 2
        parts = [write_rows(directory / "a.jsonl", rows[:half]), write_rows(directory / "b.jsonl", rows[half:])]
        mix = [{"name": "a", "path": parts[0], "weight": 3}, {"name": "b", "path": parts[1], "weight": 1}]
        data_pass(directory, None, whole)  # warm-up: imports, the json builder, the page cache
        times = [(data_pass(directory, None, whole), data_pass(directory, mix, None)) for _ in range(args.repeats)]
        one, two = (min(pair) for pair in zip(*times))  # interleaved, so a busy moment slows both alike
    print(f"one source:  {args.rows / one:,.0f} rows/s ({one:.2f} s)")
    print(f"two, mixed:  {args.rows / two:,.0f} rows/s ({two:.2f} s), {two / one:.2f}x the time")


if __name__ == "__main__":
    main()
