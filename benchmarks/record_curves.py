"""Records full validation curves of LoRA configurations on the tiny task, for benchmarks/pruning_replay.py.

As `make bench-sweep` does, it first fine-tunes the tiny model (a LoRA search needs a base that knows something), then
runs every configuration of a grid over lora_search's space to its full step budget: per learning rate and rank, one
`sweep=lora_search` with the grid sampler and no pruning over the warm-ups, in a study of its own SQLite file
(<work>/curves-lr<i>-r<j>.db), so that `--jobs N` records N of these at once on a machine with the cores for it. The
studies are the cache: running the script again continues them, and only the missing configurations train. The curves
go to a JSON file of
{"max_steps", "max_warmup_ratio", "curves": [{"params", "points": [[step, lr_area, val/loss], ...]}]}.

With --signals, every run also takes the signals of tunelab.sweep.signals at each validation but the last (a cooled
fork of --fork-steps steps, the EMA of the weights; the run itself unchanged) and each configuration is also run to a
complete schedule of 1/5 and 1/3 of the budget; a curve then adds "fork_steps", "cooled" and "ema" ([[step, value],
...]) and "short" ({steps: final val/loss}). The full grid (7 LRs x 4 ranks x 5 warm-ups) needs a machine with cores
(--jobs N); --lr-index and --rank-index record a part of it.

Usage: python benchmarks/record_curves.py [--work DIR] [--out benchmarks/pruning_curves.json] [--jobs N]
       [--lrs K | --lr-index I,J] [--rank-index I,J] [--warmups 0,0.1] [--max-steps 150] [--val-every 25]
       [--base-steps 400] [--threads T] [--signals --fork-steps 5]
"""

import argparse
import csv
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


SHORT_FRACTIONS = (5, 3)  # complete-schedule runs of 1/5 and 1/3 of the budget, with --signals


def study_name(shard: tuple[int, int], steps: int | None = None) -> str:
    return f"curves-lr{shard[0]}-r{shard[1]}" + (f"-short{steps}" if steps else "")


def storage(work: Path, shard: tuple[int, int], steps: int | None = None) -> str:
    return f"sqlite:///{work / study_name(shard, steps)}.db"


def shards(lrs, ranks) -> list[tuple[int, int]]:
    """(learning rate, rank) index pairs: one study each, over the warm-ups."""
    return [(lr, rank) for lr in lrs for rank in ranks]


def choice(values) -> str:
    return f"choice({','.join(map(str, values))})"


def train_base(work: Path, steps: int, env: dict, overrides=()) -> Path:
    base = work / "base"
    if not (base / "export" / "config.json").exists():
        run([sys.executable, "train.py", f"hydra.run.dir={base}", f"trainer.max_steps={steps}", "logger=none",
             "callbacks.progress_bar=null", "eval=none", *overrides], env, work / "base.log")
    return base / "export"


def record(work: Path, base: Path, shard: tuple[int, int], max_steps: int, val_every: int, env: dict,
           warmups=WARMUP_RATIOS, signals: int = 0, short: int | None = None, overrides=()) -> None:
    """One study over the warm-ups; `signals`: fork steps of the cooled fork (0: no signals); `short`: a complete
    schedule of that many steps instead of max_steps, validated at its end only."""
    name = study_name(shard, short)
    extra = ["logger=csv"] if signals and not short else ["logger=none"]
    if signals and not short:
        extra += ["+callbacks.cooldown_fork._target_=tunelab.sweep.signals.CooldownFork",
                  f"+callbacks.cooldown_fork.steps={signals}",
                  "+callbacks.weight_average._target_=tunelab.sweep.signals.WeightAverage"]
    steps = short or max_steps
    run([sys.executable, "train.py", "-m", "sweep=lora_search", "hydra.sweeper.params=null",
         "hydra/sweeper/sampler=grid", "hydra/sweeper/pruner=none", f"optim.lr={choice([LRS[shard[0]]])}",
         f"peft.r={choice([RANKS[shard[1]]])}", f"optim.warmup_ratio={choice(warmups)}",
         f"hydra.sweeper.n_trials={len(warmups)}", f"hydra.sweeper.study_name={name}",
         f"hydra.sweeper.storage={storage(work, shard, short)}", f"hydra.sweep.dir={work / f'multirun-{name}'}",
         f"model.name_or_path={base}", "model.init=pretrained", "model.tokenizer=null",
         f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps if short else val_every}", "callbacks=none",
         "export=false", "eval=none", *extra, *overrides],
        env, work / f"{name}.log")


def logged_signals(work: Path, shard: tuple[int, int], number: int) -> dict:
    """{"cooled": [[step, value], ...], "ema": [...]} from a trial's metrics.csv (logger=csv in its job dir)."""
    path = work / f"multirun-{study_name(shard)}" / str(number) / "csv" / "version_0" / "metrics.csv"
    found = {"cooled": [], "ema": []}
    if path.exists():
        for row in csv.DictReader(path.open()):
            for signal in found:
                if row.get(f"val/loss_{signal}"):
                    found[signal].append([int(row["step"]), float(row[f"val/loss_{signal}"])])
    return found


def run(command: list[str], env: dict, log: Path) -> None:
    with log.open("a") as out:
        if subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"tunelab: error: {' '.join(command[:4])} ... failed: see {log}")


def export(work: Path, chosen: list[tuple[int, int]], max_steps: int, out: Path, fork_steps: int = 0) -> int:
    """Writes the complete trials' curves, each validation with its LR area under the trial's own schedule, and where
    recorded the signals and the short complete-schedule runs' final losses. (*) A signal is logged at the step
    Lightning logs its validation's val/loss at, one behind the optimizer step the trial reports it at (signals
    recorded before 2026-12-05 were logged at that step itself)."""
    import optuna
    from omegaconf import OmegaConf

    from tunelab.optim import lr_area

    min_lr_ratio = OmegaConf.load(ROOT / "conf" / "optim" / "adamw_cosine.yaml").min_lr_ratio
    curves = []
    for shard in chosen:
        if not (work / f"{study_name(shard)}.db").exists():
            continue
        complete = optuna.trial.TrialState.COMPLETE
        study = optuna.load_study(study_name=study_name(shard), storage=storage(work, shard))
        shorts = {steps: {t.params["optim.warmup_ratio"]: t.value
                          for t in optuna.load_study(study_name=study_name(shard, steps), storage=storage(work, shard, steps))
                          .get_trials(states=(complete,))}
                  for steps in short_steps(max_steps) if (work / f"{study_name(shard, steps)}.db").exists()}
        for trial in study.get_trials(states=(complete,)):
            warmup = round(trial.params["optim.warmup_ratio"] * max_steps)  # tunelab.optim.warmup_steps
            points = [[step, lr_area(step, max_steps, warmup, min_lr_ratio), loss]
                      for step, loss in sorted(trial.intermediate_values.items())]
            curve = {"params": trial.params, "points": points}
            if fork_steps:
                steps = {step for step, _, _ in points}
                signals = {name: [[step if step in steps else step + 1, value] for step, value in values]  # (*)
                           for name, values in logged_signals(work, shard, trial.number).items()}
                curve.update(fork_steps=fork_steps, **signals)
                curve["short"] = {str(steps): values[trial.params["optim.warmup_ratio"]]
                                  for steps, values in shorts.items() if trial.params["optim.warmup_ratio"] in values}
            curves.append(curve)
    out.write_text(json.dumps({"max_steps": max_steps, "max_warmup_ratio": max(WARMUP_RATIOS), "curves": curves}))
    return len(curves)


def short_steps(max_steps: int) -> list[int]:
    return [max_steps // fraction for fraction in SHORT_FRACTIONS]


def indices(text: str | None, count: int) -> list[int]:
    return list(range(count)) if text is None else [int(i) for i in text.split(",")]


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
    parser.add_argument("--lr-index", help="comma-separated indices into LRS (instead of --lrs)")
    parser.add_argument("--rank-index", help="comma-separated indices into RANKS (default: all)")
    parser.add_argument("--warmups", help="comma-separated warm-up ratios (default: all of WARMUP_RATIOS)")
    parser.add_argument("--signals", action="store_true", help="also record the cooled fork, the EMA, short runs")
    parser.add_argument("--fork-steps", type=int, default=5)
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for every run, e.g. kernels=none on a GPU (repeatable)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    env = {**os.environ, "TUNELAB_CACHE": str(args.work / "cache"), "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    chosen = shards(indices(args.lr_index, min(args.lrs, len(LRS))), indices(args.rank_index, len(RANKS)))
    warmups = WARMUP_RATIOS if args.warmups is None else tuple(float(w) for w in args.warmups.split(","))
    fork_steps = args.fork_steps if args.signals else 0
    jobs = [(shard, None) for shard in chosen] + [(shard, steps) for shard in chosen if fork_steps
                                                  for steps in short_steps(args.max_steps)]
    if not args.export_only:
        base = train_base(args.work, args.base_steps, env, args.override)
        threads = str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
        env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: record(args.work, base, job[0], args.max_steps, args.val_every, env, warmups,
                                             fork_steps, job[1], args.override), jobs))
    count = export(args.work, chosen, args.max_steps, args.out, fork_steps)
    print(f"{count} curves of {args.max_steps} steps in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
