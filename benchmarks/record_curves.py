"""Records full validation curves of LoRA configurations on the tiny task, for benchmarks/pruning_replay.py.

As `make bench-sweep` does, it first fine-tunes the tiny model (a LoRA search needs a base that knows something), then
runs every configuration of a grid over lora_search's space to its full step budget: per learning rate and rank, one
`sweep=lora_search` with the grid sampler and no pruning over the warm-ups, in a study of its own SQLite file
(<work>/curves-lr<i>-r<j>.db), so that `--jobs N` records N of these at once on a machine with the cores for it. The
studies are the cache: running the script again continues them, and only the missing configurations train. The curves
go to a JSON file of
{"max_steps", "max_warmup_ratio", "curves": [{"params", "points": [[step, lr_area, val/loss], ...]}]}.

Usage: python benchmarks/record_curves.py [--work DIR] [--out benchmarks/pruning_curves.json] [--jobs N]
       [--lrs K] [--max-steps 150] [--val-every 25] [--base-steps 400] [--threads T]
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = (1e-4, 2.5e-4, 6e-4, 1.5e-3, 4e-3, 1e-2, 3e-2)  # lora_search's log-scale interval [1e-4, 3e-2], x2.5 apart
RANKS = (4, 8, 16, 32)
WARMUP_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2)  # lora_search's interval [0, 0.2]


def study_name(shard: tuple[int, int]) -> str:
    return f"curves-lr{shard[0]}-r{shard[1]}"


def storage(work: Path, shard: tuple[int, int]) -> str:
    return f"sqlite:///{work / study_name(shard)}.db"


def shards(lr_count: int) -> list[tuple[int, int]]:
    """(learning rate, rank) index pairs: one study each, over the warm-ups."""
    return [(lr, rank) for lr in range(lr_count) for rank in range(len(RANKS))]


def choice(values) -> str:
    return f"choice({','.join(map(str, values))})"


def train_base(work: Path, steps: int, env: dict) -> Path:
    base = work / "base"
    if not (base / "export" / "config.json").exists():
        run([sys.executable, "train.py", f"hydra.run.dir={base}", f"trainer.max_steps={steps}", "logger=none",
             "callbacks.progress_bar=null"], env, work / "base.log")
    return base / "export"


def record(work: Path, base: Path, shard: tuple[int, int], max_steps: int, val_every: int, env: dict) -> None:
    name = study_name(shard)
    run([sys.executable, "train.py", "-m", "sweep=lora_search", "hydra.sweeper.params=null",
         "hydra/sweeper/sampler=grid", "hydra/sweeper/pruner=none", f"optim.lr={choice([LRS[shard[0]]])}",
         f"peft.r={choice([RANKS[shard[1]]])}", f"optim.warmup_ratio={choice(WARMUP_RATIOS)}",
         f"hydra.sweeper.n_trials={len(WARMUP_RATIOS)}", f"hydra.sweeper.study_name={name}",
         f"hydra.sweeper.storage={storage(work, shard)}", f"hydra.sweep.dir={work / f'multirun-{name}'}",
         f"model.name_or_path={base}", "model.init=pretrained", "model.tokenizer=null",
         f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={val_every}", "callbacks=none",
         "export=false", "logger=none"],
        env, work / f"{name}.log")


def run(command: list[str], env: dict, log: Path) -> None:
    with log.open("a") as out:
        if subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"tunelab: error: {' '.join(command[:4])} ... failed: see {log}")


def export(work: Path, lr_count: int, max_steps: int, out: Path) -> int:
    """Writes the complete trials' curves, each validation with its LR area under the trial's own schedule."""
    import optuna
    from omegaconf import OmegaConf

    from tunelab.optim import lr_area

    min_lr_ratio = OmegaConf.load(ROOT / "conf" / "optim" / "adamw_cosine.yaml").min_lr_ratio
    trials = []
    for shard in shards(lr_count):
        if (work / f"{study_name(shard)}.db").exists():
            study = optuna.load_study(study_name=study_name(shard), storage=storage(work, shard))
            trials += study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    curves = []
    for trial in trials:
        warmup = round(trial.params["optim.warmup_ratio"] * max_steps)  # tunelab.optim.warmup_steps
        points = [[step, lr_area(step, max_steps, warmup, min_lr_ratio), loss]
                  for step, loss in sorted(trial.intermediate_values.items())]
        curves.append({"params": trial.params, "points": points})
    out.write_text(json.dumps({"max_steps": max_steps, "max_warmup_ratio": max(WARMUP_RATIOS), "curves": curves}))
    return len(curves)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-pruning-curves"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "pruning_curves.json")
    parser.add_argument("--jobs", type=int, default=1, help="studies recorded at once, each its own process")
    parser.add_argument("--lrs", type=int, default=len(LRS), help="record only the first K learning rates")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (0: the cores shared out)")
    parser.add_argument("--export-only", action="store_true", help="write the curves complete so far, train nothing")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--base-steps", type=int, default=400)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    env = {**os.environ, "TUNELAB_CACHE": str(args.work / "cache"), "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    lr_count = min(args.lrs, len(LRS))
    if not args.export_only:
        base = train_base(args.work, args.base_steps, env)
        threads = str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
        env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda shard: record(args.work, base, shard, args.max_steps, args.val_every, env),
                          shards(lr_count)))
    print(f"{export(args.work, lr_count, args.max_steps, args.out)} curves of {args.max_steps} steps in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
