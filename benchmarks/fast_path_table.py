"""The fast-path table from one gpu_fast_path.sh call: tokens/s, MFU, peak memory and the ratios to the hand-written
loops measured in the same call (and of float8 runs to their bf16 twins), then how closely the fast path's train
losses follow the plain path's, float8's validation curve beside bf16's, and Llama-3.1-8B LoRA against the published
single-H100 figure.
Usage: python benchmarks/fast_path_table.py <OUT dir> [<RUNS dir>]"""

import csv
import json
import sys
from pathlib import Path

PARAMS, LAYERS, HIDDEN, SEQ, PEAK = 1_235_814_400, 16, 2048, 2048, 989e12  # llama1b at 2048; H100 dense bf16
LLAMA8B = dict(params=8_030_261_248, layers=32, hidden=4096, seq=4096)
NEMO_8B_LORA = 12_473  # NeMo AutoModel, Llama-3.1-8B LoRA, one H100, 2 x 4096, bf16 (shared/ANCHORS.md)
FP8_TWINS = {"full_fp8": "full_fast", "full_fp8_rowwise": "full_fast", "lora_fp8": "lora_fast",
             "llama8b_lora_fp8": "llama8b_lora"}


def mfu(tokens_per_s: float, lora: bool, params=PARAMS, layers=LAYERS, hidden=HIDDEN, seq=SEQ) -> float:
    """Against the bf16 peak also for float8 runs: the same work, so the figures compare."""
    return tokens_per_s * ((4 if lora else 6) * params + 12 * layers * hidden * seq) / PEAK


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def main(out: Path) -> None:
    refs = {f"{r['variant']}" + (f"_b{r['batch']}" if r["batch"] != 4 else ""): r for r in lines(out / "reference.jsonl")}
    runs = {r["run"]: r for r in lines(out / "figures.jsonl")}
    print("| runner | tokens/s | MFU | peak GiB | vs ref compile | vs ref liger | float8 vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, ref in refs.items():
        print(f"| hand-written {name} | {ref['tokens_per_s_median']:,.0f} | {100 * ref['mfu']:.1f}% | "
              f"{ref['peak_gib']:.2f} | | | |")
    for name, run in runs.items():
        rate = run["median_tokens_per_s"]
        if not rate:
            print(f"| tunelab {name} | failed | | | | | |")
            continue
        lora = name.startswith(("lora", "llama8b"))
        batch = "_b8" if name.endswith("_b8") else ""
        fixed = not name.startswith(("real", "parity", "llama8b"))  # the hand-written loops' shape
        base = refs.get(("lora_compile" if lora else "compile") + batch, {}).get("tokens_per_s_median") if fixed else None
        liger = None if lora or not fixed else refs.get("liger", {}).get("tokens_per_s_median")
        twin = runs.get(FP8_TWINS.get(name.removesuffix("_checkpointed"), ""), {}).get("median_tokens_per_s")
        share = 100 * (mfu(rate, lora, **LLAMA8B) if name.startswith("llama8b") else mfu(rate, lora))
        print(f"| tunelab {name} | {rate:,} | {f'{share:.1f}%' if fixed or name.startswith('llama8b') else ''} | "
              f"{run['peak_gpu_memory_gib']:.2f} | {f'{rate / base:.2f}x' if base else ''} | "
              f"{f'{rate / liger:.2f}x' if liger else ''} | {f'{rate / twin:.2f}x' if twin else ''} |")
    for name, run in runs.items():
        if name.startswith("llama8b") and run["median_tokens_per_s"]:
            print(f"\n{name}: {run['median_tokens_per_s'] / NEMO_8B_LORA:.2f}x NeMo AutoModel's {NEMO_8B_LORA:,} tokens/s "
                  f"(Llama-3.1-8B LoRA, one H100), peak {run['peak_gpu_memory_gib']:.1f} GiB")
    if runs.get("real_packed", {}).get("median_tokens_per_s") and runs.get("full_fast", {}).get("median_tokens_per_s"):
        packed = runs["real_packed"]["median_tokens_per_s"]
        print(f"\nreal-length packed vs fixed-length fast path: {packed / runs['full_fast']['median_tokens_per_s']:.2f}x;"
              + "".join(f" vs {k}: {packed / runs[k]['median_tokens_per_s']:.2f}x" for k in ("real_padded", "real_padded_plain")
                        if runs.get(k, {}).get("median_tokens_per_s")))

    if len(sys.argv) > 2:
        for fast, plain in (("full_fast", "full_plain"), ("lora_fast", "lora_plain")):
            a, b = (metric_curve(Path(sys.argv[2]) / name, "train/loss") for name in (fast, plain))
            steps = sorted(a.keys() & b.keys())
            if steps:
                worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)
                print(f"\n{fast} vs {plain} train/loss at steps {steps}: largest relative difference {worst:.2e}")
        parity_curves(Path(sys.argv[2]))


def parity_curves(runs: Path) -> None:
    """float8 against bf16 over the same 300 steps: validation loss at each validation, train loss every 25 steps."""
    bf16, fp8 = metric_curve(runs / "parity_bf16", "val/loss"), metric_curve(runs / "parity_fp8", "val/loss")
    if not (bf16 and fp8):
        return
    print("\n| step | val/loss bf16 | val/loss fp8 | fp8 vs bf16 |\n|---|---|---|---|")
    for step in sorted(bf16.keys() & fp8.keys()):
        print(f"| {step} | {bf16[step]:.4f} | {fp8[step]:.4f} | {100 * (fp8[step] / bf16[step] - 1):+.2f}% |")
    train_bf16, train_fp8 = (metric_curve(runs / name, "train/loss") for name in ("parity_bf16", "parity_fp8"))
    steps = [s for s in sorted(train_bf16.keys() & train_fp8.keys()) if s % 25 == 24 or s == 0]
    print("\ntrain/loss, bf16 / fp8: " + ", ".join(f"{s + 1}: {train_bf16[s]:.3f} / {train_fp8[s]:.3f}" for s in steps))

def metric_curve(run_dir: Path, metric: str) -> dict[int, float]:
    files = list(run_dir.glob("csv/version_*/metrics.csv"))
    rows = csv.DictReader(open(files[0])) if files else []
    return {int(r["step"]): float(r[metric]) for r in rows if r.get(metric)}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
