"""`make bench-data`: data.streaming=true against the cached path on a ~2 GB JSON-lines file (issue 32's table).

On a file of --rows realistic-length alpaca rows (benchmarks/real_length_data.py's generator, ~400 bytes a row):
- the streaming pipeline alone (one consumer: read, parse, template, tokenize, batch): rows/s;
- the default job's consumption (the embedded model training on these rows, streamed): rows/s trained;
- train.py with data.streaming=true: seconds from the process's start to its first step, resident memory over the
  run (after step 5 and at the end), bytes written outside the run's checkpoints (datasets cache, tokenized copies);
- train.py with the cached path on the same file: the same, where it reaches its first step within --cached-timeout.

Usage: python benchmarks/stream_data.py [--rows 5000000] [--steps 200] [--work /tmp/tunelab_stream_bench]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]


def write_rows(path: Path, rows: int, distinct: int = 200_000) -> None:
    """`rows` rows: the generator's first `distinct` written over and over (generating 5M rows takes about an hour on
    this machine's Python; the pipeline reads, parses and tokenizes a repeated row as it does a new one)."""
    from real_length_data import row

    rng = random.Random(0)
    block = "".join(json.dumps(row(rng)) + "\n" for _ in range(min(rows, distinct)))
    with path.open("w") as file:
        for _ in range(rows // distinct):
            file.write(block)
        file.write("".join(block.splitlines(keepends=True)[:rows % distinct]))


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def pipeline_rows_per_second(path: Path, seconds: float = 20) -> float:
    from tunelab.char_tokenizer import build_char_tokenizer
    from tunelab.data.rows import RowTokenizer
    from tunelab.data.streaming import StreamConsumer
    from tunelab.data.streams import JsonLinesRows

    tokenizer = build_char_tokenizer()
    templates = ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n")
    consumer = StreamConsumer([JsonLinesRows(path)], [1.0], [None],
                              [RowTokenizer("alpaca", templates, tokenizer, 1024, "all_assistant", "cut_turns")],
                              ["alpaca"], consumer=0, consumers=1, seed=0, block_size=10_000, batch_size=8,
                              pad_token_id=tokenizer.pad_token_id, pack_tokens=None)
    batches, start = consumer.batches(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
    return sum(consumer.fates.values()) / (time.perf_counter() - start)


def train(path: Path, run_dir: Path, cache: Path, steps: int, streaming: bool, timeout: float) -> dict:
    """One train.py run with the step probe; its figures, or how far it got within `timeout`."""
    probe = run_dir.parent / f"{run_dir.name}_steps.txt"
    probe.unlink(missing_ok=True)
    args = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "data=jsonl", f"data.path={path}",
            f"data.streaming={str(streaming).lower()}", "data.max_length=1024", "data.max_val_examples=64",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "callbacks.samples=null",
            "validate_at_start=false", "export=false", "callbacks.progress_bar=null",
            "+callbacks.probe._target_=step_probe.StepProbe", f"+callbacks.probe.path={probe}"]
    env = {**os.environ, "TUNELAB_CACHE": str(cache), "TUNELAB_EVAL_AUTO": "off",
           "PYTHONPATH": f"{ROOT / 'benchmarks'}:{os.environ.get('PYTHONPATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir.parent / 'mlflow.db'}"}
    started = time.time()
    try:
        completed = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        finished = completed.returncode == 0
        if not finished:
            print(completed.stderr[-3000:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        finished = False
    lines = [line.split() for line in probe.read_text().splitlines()] if probe.exists() else []
    steps_seen = [(int(step), float(at), int(rss)) for step, at, rss in lines]
    figures = {"finished": finished, "wall_s": round(time.time() - started, 1), "steps": len(steps_seen),
               "cache_bytes": directory_bytes(cache)}
    if steps_seen:
        figures["first_step_s"] = round(steps_seen[0][1] - started, 1)
        figures["rss_mb_step5"] = round(steps_seen[min(4, len(steps_seen) - 1)][2] / 1e6)
        figures["rss_mb_last"] = round(steps_seen[-1][2] / 1e6)
        if len(steps_seen) > 10:
            span = steps_seen[-1][1] - steps_seen[5][1]
            figures["steps_per_s"] = round((len(steps_seen) - 6) / span, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab_stream_bench"))
    parser.add_argument("--cached-timeout", type=float, default=1800)
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    path = options.work / f"rows_{options.rows}.jsonl"
    if not path.exists():
        start = time.time()
        write_rows(path, options.rows)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - start:.0f} s", flush=True)
    size_gb = path.stat().st_size / 1e9
    pipeline = pipeline_rows_per_second(path)
    print(f"pipeline alone: {pipeline:,.0f} rows/s", flush=True)
    results = {}
    for name, streaming, timeout in (("streaming", True, 3600), ("cached", False, options.cached_timeout)):
        cache = options.work / f"cache_{name}"
        subprocess.run(["rm", "-rf", str(cache), str(options.work / name)])
        results[name] = train(path, options.work / name, cache, options.steps, streaming, timeout)
        print(name, json.dumps(results[name]), flush=True)
    batch = 8  # data=jsonl's batch_size
    consumed = results["streaming"].get("steps_per_s", 0) * batch
    print(f"\n{options.rows:,} rows, {size_gb:.2f} GB; the embedded model trains on {consumed:.1f} rows/s "
          f"({results['streaming'].get('steps_per_s')} steps/s x {batch}); the pipeline alone reads {pipeline:,.0f} rows/s "
          f"({pipeline / max(consumed, 1e-9):,.0f}x that)\n")
    print("| path | first step (s from start) | RSS after step 5 / at the end (MB) | written outside checkpoints | finished |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        first = r.get("first_step_s", f"none within {r['wall_s']:.0f}")
        rss = f"{r.get('rss_mb_step5', '-')} / {r.get('rss_mb_last', '-')}"
        print(f"| {name} | {first} | {rss} | {r['cache_bytes'] / 1e9:.2f} GB | {r['finished']} ({r['steps']} steps) |")


if __name__ == "__main__":
    main()
