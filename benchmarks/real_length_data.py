"""Writes a synthetic instruction set with realistic lengths, offline, as alpaca-shaped JSON lines
(`instruction`, `input`, `output`), for benchmarking padding, packing and bucketing on uneven examples.

Lengths are in characters, which tunelab's char tokenizer maps one-to-one to tokens. Each example's total length
(prompt + answer + a ~40-char template overhead) is log-normal with median ~250 and sigma 0.8 -- a long tail like
real instruction data -- capped at 2048. The prompt takes on average 40% of the text (per row a Beta(4, 6) draw) and
the answer the rest; about a third of the rows carry a non-empty `input`, which takes part of the prompt. Text is
random lowercase words from a seeded RNG; the same seed gives the same file. Standard library only.

Usage: python benchmarks/real_length_data.py OUT.jsonl [--rows 8000] [--seed 0]
"""

import argparse
import json
import math
import random
import statistics
import string

MEDIAN, SIGMA, CAP = 250, 0.8, 2048
TEMPLATE_OVERHEAD = 40  # roughly what data=jsonl's "### Instruction: ... ### Response:" template adds
PROMPT_SHARE = (4, 6)  # Beta(a, b): mean a / (a + b) = 0.4 of the text goes to the prompt
INPUT_RATE = 0.35


def text(rng: random.Random, n: int) -> str:
    """n characters of lowercase 'words' (1-10 letters) separated by single spaces."""
    words, size = [], 0
    while size <= n:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 10)))
        words.append(word)
        size += len(word) + 1
    out = " ".join(words)[:n]
    return out[:-1] + "e" if out.endswith(" ") else out


def row(rng: random.Random) -> dict:
    total = min(CAP, max(TEMPLATE_OVERHEAD + 8, round(rng.lognormvariate(math.log(MEDIAN), SIGMA))))
    body = total - TEMPLATE_OVERHEAD
    prompt = max(4, min(body - 4, round(body * rng.betavariate(*PROMPT_SHARE))))
    inp = round(prompt * rng.uniform(0.3, 0.7)) if rng.random() < INPUT_RATE else 0
    return {"instruction": text(rng, prompt - inp), "input": text(rng, inp), "output": text(rng, body - prompt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    totals, prompt_shares = [], []
    with open(args.out, "w") as f:
        for _ in range(args.rows):
            r = row(rng)
            f.write(json.dumps(r) + "\n")
            prompt = len(r["instruction"]) + len(r["input"])
            totals.append(prompt + len(r["output"]) + TEMPLATE_OVERHEAD)
            prompt_shares.append(prompt / (prompt + len(r["output"])))
    totals.sort()
    q = lambda p: totals[min(len(totals) - 1, int(p * len(totals)))]  # noqa: E731
    print(f"{args.out}: rows {len(totals)}, total length (chars incl. {TEMPLATE_OVERHEAD}-char template) "
          f"median {statistics.median(totals):.0f} mean {statistics.mean(totals):.1f} p90 {q(0.9)} p99 {q(0.99)} "
          f"max {totals[-1]}; prompt share mean {statistics.mean(prompt_shares):.2f}; seed {args.seed}")


if __name__ == "__main__":
    main()
