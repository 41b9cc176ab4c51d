"""The lm-evaluation-harness tasks tunelab ships (tasks/*.yaml), and the held-out rows of the embedded one.

A shipped task names its data file relative to its YAML (`dataset_kwargs: {data_files: {test: tunelab_tiny.jsonl}}`),
where the harness would read it relative to the working directory: `task_dir` writes copies whose paths are absolute
under the cache, so the harness reads them from any directory (and `lm_eval --include_path <that dir>` does too).
Only the standard library and PyYAML here: tunelab.config reads the task names before anything heavy is imported.
"""

import json
import os
import random
from pathlib import Path

import yaml

from tunelab.tiny_task import OPERATIONS, make_example, write_tiny_task

TASKS_DIR = Path(__file__).parent / "tasks"
TINY_TASK = "tunelab_tiny"
# The rows of tasks/tunelab_tiny.jsonl (both shipped tasks read it): drawn from their own seed, none among the default
# job's training rows.
HELD_OUT_SEED, HELD_OUT_COUNT = 20_250, 200


def local_task_configs() -> dict[str, dict]:
    """Each shipped task's YAML, by task name."""
    configs = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        configs[config["task"]] = config
    return configs


def local_task_metrics(name: str) -> list[str]:
    return [entry["metric"] for entry in local_task_configs()[name].get("metric_list", [])]


def task_dir(cache_dir: str | Path) -> Path:
    """The shipped tasks, their data files resolved to absolute paths, in a directory of the cache."""
    directory = Path(cache_dir) / "lm_eval_tasks"
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / name) for split, name in files.items()}
        text = yaml.safe_dump(config, sort_keys=False)
        target = directory / path.name
        if not target.is_file() or target.read_text() != text:
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(target)  # atomic: ranks and sweep workers write the same file at once
    return directory


def held_out_rows(count: int = HELD_OUT_COUNT, seed: int = HELD_OUT_SEED, cache_dir: str | Path | None = None) -> list[dict]:
    """`count` examples of the embedded task, none of which the default job (data=tiny: 4000 rows, seed 1234) trains
    or validates on; each also with `choices`, every operation's answer for its input, and `label`, the right one's
    index (the multiple-choice task tunelab_tiny_choice)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        seen = {line for line in write_tiny_task(Path(cache_dir or tmp), 4000, 1234).read_text().splitlines()}
    rng, rows = random.Random(seed), []
    while len(rows) < count:
        row = make_example(rng)
        if json.dumps(row) not in seen:
            operations = sorted(OPERATIONS)
            choices = [OPERATIONS[operation](row["input"]) for operation in operations]
            rows.append({**row, "choices": choices, "label": operations.index(row["instruction"])})
    return rows


if __name__ == "__main__":  # rewrites tasks/tunelab_tiny.jsonl (after a change to tunelab.tiny_task)
    (TASKS_DIR / f"{TINY_TASK}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in held_out_rows()))
