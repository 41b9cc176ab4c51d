"""What training every assistant turn costs the tokenization pass: rows per second on the CPU, one process, over
multi-turn chat rows through Qwen2.5's released template (tests/chat_templates.json) on the char tokenizer with
ChatML's special tokens. Three paths: the last-turn path before per-turn masking (tunelab.data.formats at COMMIT, read
from git), and tunelab.data.rows with data.train_on=last_assistant and all_assistant.

    python benchmarks/chat_tokenization.py [--rows 2000] [--turns 4]
"""

import argparse
import json
import random
import subprocess
import sys
import time
import types
from pathlib import Path

from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data.rows import RowTokenizer

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "90f8440"  # the data package before every assistant turn was trained


def old_formats():
    source = subprocess.run(["git", "show", f"{COMMIT}:src/tunelab/data/formats.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("old_formats")
    exec(compile(source, "old_formats", "exec"), module.__dict__)
    return module


def conversations(count: int, turns: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(n))

    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(8)}]
        for _ in range(turns):
            messages += [{"role": "user", "content": text(20)}, {"role": "assistant", "content": text(40)}]
        rows.append({"messages": messages})
    return rows


def rows_per_second(tokenize, rows: list[dict]) -> float:
    start = time.perf_counter()
    for row in rows:
        tokenize(row)
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=4, help="user/assistant exchanges per row")
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = json.loads((ROOT / "tests" / "chat_templates.json").read_text())["qwen2_5"]
    rows = conversations(args.rows, args.turns)
    old = old_formats()

    def before(row: dict) -> dict:
        prompt, answer = old.split_prompt_answer(row, "chat", ("", ""), tokenizer)
        return old.tokenize_example(prompt, answer, tokenizer, 4096, add_bos=False)

    paths = {f"last turn, before ({COMMIT})": before,
             "train_on=last_assistant": RowTokenizer("chat", ("", ""), tokenizer, 4096, "last_assistant", "cut_turns"),
             "train_on=all_assistant": RowTokenizer("chat", ("", ""), tokenizer, 4096, "all_assistant", "cut_turns")}
    for tokenize in paths.values():
        rows_per_second(tokenize, rows[:50])  # warm the template cache
    print(f"{args.rows} rows of {args.turns} exchanges, python {sys.version.split()[0]}")
    for name, tokenize in paths.items():
        print(f"{name:32s} {rows_per_second(tokenize, rows):8.0f} rows/s")


if __name__ == "__main__":
    main()
