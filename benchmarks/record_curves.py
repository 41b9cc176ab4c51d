"""Records full validation curves of LoRA configurations on the tiny task, for benchmarks/pruning_replay.py.

As `make bench-sweep` does, it first fine-tunes the tiny model (a LoRA search needs a base that knows something), then
runs every configuration of a grid over lora_search's space to its full step budget: one `sweep=lora_search` with
the grid sampler and no pruning, in a study of <work>/curves.db. The study is the cache: running the script again
continues it, and only the missing configurations train. The curves go to a JSON file of
{"max_steps", "max_warmup_ratio", "curves": [{"params", "points": [[step, lr_area, val/loss], ...]}]}.

Usage: python benchmarks/record_curves.py [--work DIR] [--out benchmarks/pruning_curves.json] [--limit N]
       [--max-steps 150] [--val-every 25] [--base-steps 400]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = (1e-4, 2.5e-4, 6e-4, 1.5e-3, 4e-3, 1e-2, 3e-2)  # lora_search's log-scale interval [1e-4, 3e-2], x2.5 apart
RANKS = (4, 8, 16, 32)
WARMUP_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2)  # lora_search's interval [0, 0.2]
STUDY = "curves"


def grid_size() -> int:
    return len(LRS) * len(RANKS) * len(WARMUP_RATIOS)


def choice(values) -> str:
    return f"choice({','.join(map(str, values))})"


def train_base(work: Path, steps: int, env: dict) -> Path:
    base = work / "base"
    if not (base / "export" / "config.json").exists():
        run([sys.executable, "train.py", f"hydra.run.dir={base}", f"trainer.max_steps={steps}", "logger=none",
             "callbacks.progress_bar=null"], env, work / "base.log")
    return base / "export"


def record(work: Path, base: Path, n_trials: int, max_steps: int, val_every: int, env: dict) -> None:
    run([sys.executable, "train.py", "-m", "sweep=lora_search", "hydra.sweeper.params=null",
         "hydra/sweeper/sampler=grid", "hydra/sweeper/pruner=none", f"optim.lr={choice(LRS)}", f"peft.r={choice(RANKS)}",
         f"optim.warmup_ratio={choice(WARMUP_RATIOS)}", f"hydra.sweeper.n_trials={n_trials}",
         f"hydra.sweeper.study_name={STUDY}", f"hydra.sweeper.storage=sqlite:///{work / 'curves.db'}",
         f"hydra.sweep.dir={work / 'multirun-curves'}", f"model.name_or_path={base}", "model.init=pretrained",
         "model.tokenizer=null", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={val_every}",
         "callbacks=none", "export=false", "logger=none"], env, work / "curves.log")


def run(command: list[str], env: dict, log: Path) -> None:
    with log.open("a") as out:
        if subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"tunelab: error: {' '.join(command[:4])} ... failed: see {log}")


def export(work: Path, max_steps: int, out: Path) -> int:
    """Writes the complete trials' curves, each validation with its LR area under the trial's own schedule."""
    import optuna
    from omegaconf import OmegaConf

    from tunelab.optim import lr_area

    min_lr_ratio = OmegaConf.load(ROOT / "conf" / "optim" / "adamw_cosine.yaml").min_lr_ratio
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{work / 'curves.db'}")
    curves = []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
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
    parser.add_argument("--limit", type=int, default=grid_size(), help="configurations to record (the grid's order)")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--base-steps", type=int, default=400)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNELAB_CACHE": str(args.work / "cache"), "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    base = train_base(args.work, args.base_steps, env)
    record(args.work, base, min(args.limit, grid_size()), args.max_steps, args.val_every, env)
    print(f"{export(args.work, args.max_steps, args.out)} curves of {args.max_steps} steps in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
