"""The harness's results as tunelab logs them, and the base model's results kept between runs.

A task's metric `exact_match` under the harness's filter `none` is logged as `eval/<task>/exact_match`, with
`eval/<task>/exact_match_stderr`; under another filter (gsm8k's `strict-match`) as `eval/<task>/exact_match.<filter>`.
Against the base model: `eval/<task>/<metric>/base` and `eval/<task>/<metric>/delta` (trained minus base).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

PREFIX = "eval/"
RESULTS_FILE = "lm_eval_results.json"
BASE_RESULTS_FILE = "lm_eval_base_results.json"


def metric_values(results: dict) -> dict[str, float]:
    """{eval/<task>/<metric>: value, eval/<task>/<metric>_stderr: its standard error} of every task and group."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample counts, a stderr the harness could not compute ("N/A")
            stderr = name.endswith("_stderr")
            name = name.removesuffix("_stderr") if stderr else name
            if filter_name != "none":
                name = f"{name}.{filter_name}"
            metrics[f"{PREFIX}{task}/{name}{'_stderr' if stderr else ''}"] = float(value)
    return metrics


def scores(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if not name.endswith("_stderr")}


def against_base(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """eval/<task>/<metric>/base and /delta for each score the base has too."""
    compared = {}
    for name, value in scores(metrics).items():
        if name in base and math.isfinite(base[name]):
            compared[f"{name}/base"] = base[name]
            compared[f"{name}/delta"] = value - base[name]
    return compared


def summary_lines(metrics: dict[str, float], base: dict[str, float] | None, step: int | None, limit: int | None) -> list[str]:
    """One line per task score: value ± stderr, and the base with the difference where it was evaluated."""
    if not metrics:
        return []
    heading = f"eval (step {step})" if step is not None else "eval"
    lines = [heading.ljust(25) + ("lm-eval, " + (f"{limit} examples a task" if limit else "every example"))]
    for name, value in scores(metrics).items():
        line = f"  {name.removeprefix(PREFIX):<28} {value:.3f}"
        if (stderr := metrics.get(f"{name}_stderr")) is not None and math.isfinite(stderr):
            line += f" ± {stderr:.3f}"
        if base and name in base:
            line += f"   base {base[name]:.3f}  ({value - base[name]:+.3f})"
        lines.append(line)
    return lines


def base_key(model: dict, precision: str, quantize_base, seed: int, tasks: list[str], limit, num_fewshot) -> str:
    """What the base model's results depend on: the model option (a randomly initialised one also on the seed that
    drew it), the precision it runs in, a quantized base, the tasks, their limit and shots, the harness's version."""
    from importlib.metadata import version

    from tunelab.evaluation.local_tasks import TASKS_DIR

    shipped = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(TASKS_DIR.iterdir())
               if path.is_file()}
    identity = {"model": model, "precision": precision, "quantize_base": quantize_base,
                "seed": seed if model.get("init") == "random" else None, "tasks": sorted(tasks), "limit": limit,
                "num_fewshot": num_fewshot, "lm_eval": version("lm_eval"), "shipped_tasks": shipped}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_cache_file(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "eval_base" / f"{key}.json"


def load_base(cache_dir: str | Path, key: str) -> dict | None:
    path = base_cache_file(cache_dir, key)
    return json.loads(path.read_text()) if path.is_file() else None


def save_base(cache_dir: str | Path, key: str, results: dict) -> Path:
    path = base_cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_json(results))
    tmp.replace(path)  # atomic: sweep workers may evaluate the same base at once
    return path


def to_json(results: dict) -> str:
    return json.dumps(results, indent=1, default=str)
