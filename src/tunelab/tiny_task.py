"""The embedded instruction task: short string transformations a few-million-parameter model learns on a CPU
in about a minute, with an unambiguous answer so exact match is a meaningful metric."""

import json
import os
import random
from pathlib import Path

OPERATIONS = {
    "reverse": lambda word: word[::-1],
    "upper": str.upper,
    "double": lambda word: word + word,
}
LETTERS = "abcdefghijklmnop"
# Part of the file name: bump it whenever the generated rows change, so no stale file is reused.
TASK_VERSION = 2
CHAT_TASK_VERSION = 3  # the same for the two-turn rows (make_conversation)


def make_example(rng: random.Random) -> dict[str, str]:
    instruction = rng.choice(sorted(OPERATIONS))
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return {"instruction": instruction, "input": word, "output": OPERATIONS[instruction](word)}


def make_conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Two turns over one word, each answer a different function of it: `double abc` → `abcabc`, then `upper` → `ABC`
    (the word from the first turn). A model trained only on the last turn never learns the first answer. Copying
    answers of 3-4 letter words: with `reverse` in the first turn, the tiny model learned it in 200 steps on one seed
    and not in 250 on others."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4)))
    return {"messages": [{"role": "user", "content": f"double {word}"}, {"role": "assistant", "content": word * 2},
                         {"role": "user", "content": "upper"}, {"role": "assistant", "content": word.upper()}]}


def write_tiny_task(directory: Path, num_examples: int, seed: int, chat: bool = False) -> Path:
    """Writes the task as JSON lines once per (size, seed) and returns the file's path: alpaca-style rows, or
    two-turn chat rows (make_conversation) where `chat`."""
    kind = f"chat{CHAT_TASK_VERSION}-" if chat else ""
    path = Path(directory) / f"tiny-task-v{TASK_VERSION}-{kind}{num_examples}-seed{seed}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for _ in range(num_examples):
            f.write(json.dumps(make_conversation(rng) if chat else make_example(rng)) + "\n")
    tmp.replace(path)  # atomic, so parallel sweep workers never read half a file
    return path
