"""Packed against padded preference pairs on the CPU (issue 33): what share of the tokens a forward computes are real,
and the time of one training step (policy forward + backward, plus the reference pass where the loss has one) per
trained token, for DPO with a frozen copy and for the reference-free SimPO, padded and packed.

Pairs at realistic lengths (benchmarks/real_length_data.py rows: chosen the row's answer, rejected the next row's),
the embedded model (random init, float32, full fine-tune, the plain loss path), 4 pairs a padded batch and rows of
2 x 4 x 1024 tokens packed. CPU figures only say what padding costs and what the reference pass costs; the GPU
figures (varlen flash attention) wait for a card (benchmarks/gpu_stages.sh, real_*_packed).

Usage: OMP_NUM_THREADS=1 python benchmarks/probes/packed_pairs_cpu.py [--pairs 64] [--steps 6]
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_length_data import row  # noqa: E402

from tunelab.char_tokenizer import build_char_tokenizer  # noqa: E402
from tunelab.data.preference import PackedPairCollator, PairTokenizer, PreferenceCollator  # noqa: E402
from tunelab.data.samplers import pack_in_order  # noqa: E402
from tunelab.model import build_model  # noqa: E402
from tunelab.modules.dpo import DPOModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ("### Instruction:\n{instruction}\n\n### Response:\n",) * 2


def real_pairs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [row(rng) for _ in range(count + 1)]
    return [{"prompt": f"{r['instruction']}\n{r['input']}", "chosen": r["output"], "rejected": other["output"]}
            for r, other in zip(rows, rows[1:])]


def step_seconds(module: DPOModule, batches: list[dict], steps: int) -> float:
    """Median seconds of one step over `steps` passes through the batches (first pass a warm-up)."""
    times = []
    for batch in batches[:steps]:
        start = time.perf_counter()
        module.model.zero_grad()
        module.pair_loss(batch, "train")[0].backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    tokenize = PairTokenizer("alpaca", TEMPLATE, tokenizer, max_length=1024)
    pairs = [{**tokenize(p), "index": i} for i, p in enumerate(real_pairs(args.pairs))]
    pairs = [p for p in pairs if p["fate"] in ("kept", "cut")]
    lengths = [len(p["input_ids"]) + len(p["rejected_input_ids"]) for p in pairs]
    budget = 2 * 4 * 1024
    padded = [PreferenceCollator(tokenizer.pad_token_id)(pairs[i:i + 4]) for i in range(0, len(pairs) - 3, 4)]
    packed = [PackedPairCollator(tokenizer.pad_token_id, budget)([pairs[i] for i in batch])
              for batch in pack_in_order(list(range(len(pairs))), lengths, budget)]
    for name, batches in (("padded", padded), ("packed", packed)):
        real = sum(int((b["labels"] != -100).sum()) for b in batches)  # noqa: F841 (answer tokens, for reference)
        computed = sum(b["input_ids"].numel() for b in batches)
        used = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"{name}: {len(batches)} forwards, {used / computed:.2f} of computed tokens real "
              f"({used} real, {computed} computed)")

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["module=dpo", "data=tiny_pairs", "precision=32_true"])
    results = {}
    for loss_type in ("sigmoid", "simpo"):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.precision, tokenizer, packed=True)
        module = DPOModule(model, cfg.optim, loss_type=loss_type, beta=0.1 if loss_type == "sigmoid" else 2.0)
        for name, batches in (("padded", padded), ("packed", packed)):
            tokens = sum(int(b["attention_mask"].sum()) for b in batches[:args.steps]) / min(args.steps, len(batches))
            results[loss_type, name] = tokens / step_seconds(module, batches, args.steps)
            print(f"{loss_type} {name}: {results[loss_type, name]:,.0f} real tokens/s")
    base = results["sigmoid", "padded"]
    print("ratios to DPO (frozen copy) padded: " + ", ".join(f"{k[0]} {k[1]} {v / base:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()
