"""Asks the model a tunelab run exported: `python generate.py <run dir or export dir> "<prompt>"` prints its answer.

The prompt is written the way the run wrote its training prompts (its alpaca template, or the tokenizer's chat
template) and answered greedily, as the validation samples were: the answer is the one the last validation showed.
"""

import argparse
import sys
from pathlib import Path

from tunelab.export import ExportNotFound, find_export, load_export


def answer(path: Path, prompt: str, input: str, max_new_tokens: int) -> str:
    directory = find_export(path)  # before torch loads: a wrong path is told at once
    import torch

    from tunelab.generation import greedy_answer

    exported = load_export(directory, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, prompt_format = exported.tokenizer, exported.prompt_format
    if input and prompt_format.format != "alpaca":
        sys.exit(f"tunelab: error: --input is the input field of alpaca-format rows, and this run's format is "
                 f"{prompt_format.format or 'plain text'}: put it in the prompt")
    ids = greedy_answer(exported.model, prompt_format.prompt_ids(tokenizer, prompt, input), exported.eos_token_id,
                        tokenizer.pad_token_id, max_new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run dir (its export/ is loaded) or an export dir")
    parser.add_argument("prompt", help="the instruction (alpaca-format runs) or the user's message (chat runs)")
    parser.add_argument("--input", default="", help="the input of an alpaca-format row (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many answer tokens (default: 64)")
    args = parser.parse_args()
    if args.max_new_tokens < 1:
        sys.exit(f"tunelab: error: --max-new-tokens={args.max_new_tokens} must be at least 1")
    try:
        print(answer(args.path, args.prompt, args.input, args.max_new_tokens))
    except ExportNotFound as error:
        sys.exit(f"tunelab: error: {error}")


if __name__ == "__main__":
    main()
