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
# Words of the preference stage (make_flawed_example, tunelab.data.preference): 3-4 letters, which the tiny model
# learns to copy within one SFT run, so what DPO changes is where a `double` answer stops, not its spelling.
SHORT_WORDS = (3, 4)
# Part of the file name: bump it whenever the generated rows change, so no stale file is reused.
TASK_VERSION = 2
CHAT_TASK_VERSION = 3  # the same for the two-turn rows (make_conversation)
FLAWED_TASK_VERSION = 1  # and for make_flawed_example's


def make_example(rng: random.Random, word_lengths: tuple[int, int] = (3, 6)) -> dict[str, str]:
    instruction = rng.choice(sorted(OPERATIONS))
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*word_lengths)))
    return {"instruction": instruction, "input": word, "output": OPERATIONS[instruction](word)}


def make_flawed_example(rng: random.Random) -> dict[str, str]:
    """An example of the embedded task on a short word, where half the `double` answers stop after one copy: the
    flawed SFT data of the SFT → DPO recipe (answers cut short, a common flaw of scraped SFT data). A model trained on
    it stops early on about half its `double` prompts; DPO on data=tiny_pairs, which rejects exactly those answers,
    is what fixes it."""
    example = make_example(rng, SHORT_WORDS)
    if example["instruction"] == "double" and rng.random() < 0.5:
        example["output"] = example["input"]
    return example


def make_conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Two turns over one word, each answer a different function of it: `double abc` → `abcabc`, then `upper` → `ABC`
    (the word from the first turn). A model trained only on the last turn never learns the first answer. Copying
    answers of 3-4 letter words: with `reverse` in the first turn, the tiny model learned it in 200 steps on one seed
    and not in 250 on others."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4)))
    return {"messages": [{"role": "user", "content": f"double {word}"}, {"role": "assistant", "content": word * 2},
                         {"role": "user", "content": "upper"}, {"role": "assistant", "content": word.upper()}]}


# data.source → (the rows' generator, its part of the file name)
GENERATORS = {
    "tiny": (make_example, ""),
    "tiny_chat": (make_conversation, f"chat{CHAT_TASK_VERSION}-"),
    "tiny_flawed": (make_flawed_example, f"flawed{FLAWED_TASK_VERSION}-"),
}
TINY_SOURCES = tuple(GENERATORS)


def write_tiny_task(directory: Path, num_examples: int, seed: int, source: str = "tiny") -> Path:
    """Writes the task as JSON lines once per (source, size, seed) and returns the file's path: alpaca-style rows
    (tiny), two-turn chat rows (tiny_chat, make_conversation) or rows with answers stopped short (tiny_flawed)."""
    generate, kind = GENERATORS[source]
    path = Path(directory) / f"tiny-task-v{TASK_VERSION}-{kind}{num_examples}-seed{seed}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for _ in range(num_examples):
            f.write(json.dumps(generate(rng)) + "\n")
    tmp.replace(path)  # atomic, so parallel sweep workers never read half a file
    return path
