"""The fast-path table from one gpu_fast_path.sh call: tokens/s, MFU, peak memory and the ratios to the hand-written
loops measured in the same call, then how closely the fast path's train losses follow the plain path's.
Usage: python benchmarks/fast_path_table.py <OUT dir> [<RUNS dir>]"""

import csv
import json
import sys
from pathlib import Path

PARAMS, LAYERS, HIDDEN, SEQ, PEAK = 1_235_814_400, 16, 2048, 2048, 989e12


def mfu(tokens_per_s: float, lora: bool) -> float:
    return tokens_per_s * ((4 if lora else 6) * PARAMS + 12 * LAYERS * HIDDEN * SEQ) / PEAK


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def main(out: Path) -> None:
    refs = {f"{r['variant']}" + (f"_b{r['batch']}" if r["batch"] != 4 else ""): r for r in lines(out / "reference.jsonl")}
    runs = {r["run"]: r for r in lines(out / "figures.jsonl")}
    print("| runner | tokens/s | MFU | peak GiB | vs ref compile | vs ref liger |")
    print("|---|---|---|---|---|---|")
    for name, ref in refs.items():
        print(f"| hand-written {name} | {ref['tokens_per_s_median']:,.0f} | {100 * ref['mfu']:.1f}% | "
              f"{ref['peak_gib']:.2f} | | |")
    for name, run in runs.items():
        rate = run["median_tokens_per_s"]
        if not rate:
            print(f"| tunelab {name} | failed | | | | |")
            continue
        lora = name.startswith("lora")
        batch = "_b8" if name.endswith("_b8") else ""
        base = refs.get(("lora_compile" if lora else "compile") + batch, {}).get("tokens_per_s_median")
        liger = None if lora else refs.get("liger", {}).get("tokens_per_s_median")
        real = name.startswith("real")
        print(f"| tunelab {name} | {rate:,} | {'' if real else f'{100 * mfu(rate, lora):.1f}%'} | "
              f"{run['peak_gpu_memory_gib']:.2f} | {f'{rate / base:.2f}x' if base and not real else ''} | "
              f"{f'{rate / liger:.2f}x' if liger and not real else ''} |")
    if runs.get("real_packed", {}).get("median_tokens_per_s") and runs.get("full_fast", {}).get("median_tokens_per_s"):
        packed = runs["real_packed"]["median_tokens_per_s"]
        print(f"\nreal-length packed vs fixed-length fast path: {packed / runs['full_fast']['median_tokens_per_s']:.2f}x;"
              + "".join(f" vs {k}: {packed / runs[k]['median_tokens_per_s']:.2f}x" for k in ("real_padded", "real_padded_plain")
                        if runs.get(k, {}).get("median_tokens_per_s")))

    if len(sys.argv) > 2:
        for fast, plain in (("full_fast", "full_plain"), ("lora_fast", "lora_plain")):
            a, b = train_losses(Path(sys.argv[2]) / fast), train_losses(Path(sys.argv[2]) / plain)
            steps = sorted(a.keys() & b.keys())
            if steps:
                worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)
                print(f"\n{fast} vs {plain} train/loss at steps {steps}: largest relative difference {worst:.2e}")


def train_losses(run_dir: Path) -> dict[int, float]:
    files = list(run_dir.glob("csv/version_*/metrics.csv"))
    rows = csv.DictReader(open(files[0])) if files else []
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
