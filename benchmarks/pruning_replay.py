"""Replays LoRA sweeps offline on recorded validation curves, to measure pruners honestly (issue 14).

Every curve was recorded once, to its full step budget (benchmarks/record_curves.py). A replayed sweep is an in-memory
Optuna study over the search space of conf/sweep/lora_search.yaml, with the sampler and pruner configs the sweeper
ships: the sampler proposes (trial k seeded with seed + k, as the sweeper does), the nearest recorded configuration
answers with its curve, the pruner decides at each validation. Per sampler x pruner, over seeds: the share of
trial-steps spent and the regret of the best found against the unpruned sweep of the same sampler and seed (median and
interquartile range); and how well a validation ranks the configurations by their final loss (Kendall tau), on the
raw-step clock at each validation and on the LR-area clock at the schedule-aligned rungs.

Beside each pruner, "first_K" rows are unpruned sweeps of only the first K proposals (regret against the full sweep
of the same seed): a pruner is worth shipping only where it beats fewer trials at equal trial-steps. With a signal
other than the validation loss (--signal cooled | ema, where the curves recorded it), a trial reports that signal at
every validation but its last, and a cooled fork's steps are charged to its trial-steps.

The replay snaps each proposal to the nearest recorded configuration, so two trials that snap alike share one curve
exactly, which flatters a pruner that projects a trial by its neighbour's curve. The live sweeps' table has no such
snapping: unpruned sweeps run live (benchmarks/sweep_efficiency.sh), replayed in their own order with their own curves
(the params as proposed), each pruner deciding as they come; there only pruning differs, the proposals stay.

Usage: python benchmarks/pruning_replay.py [curves.json] [--seeds 10] [--trials 20] [--live benchmarks/live_sweeps.json]
       [--samplers tpe,random,gp] [--signals loss,cooled,ema] [--pruners none,nearest_bound,...]
       [--pruned-trials optuna,reported]
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "pruning_curves.json"
LIVE = ROOT / "benchmarks" / "live_sweeps.json"
SAMPLERS = ("tpe", "random", "gp")
FEWER_TRIALS = (7, 10, 14)  # unpruned sweeps of only the first K proposals, the baseline every pruner must beat
SIGNALS = ("loss", "cooled", "ema")  # what a trial reports: its validation loss, a cooled fork's, its EMA weights
# name: (config in conf/hydra/sweeper/pruner, overrides); "first_validation_after_warmup" is filled in per curve set.
PRUNERS = {
    "none": ("none", {}),
    "median": ("median", {}),
    "median_after_warmup": ("median", {"n_warmup_steps": "first_validation_after_warmup"}),
    "successive_halving": ("successive_halving", {}),
    "hyperband": ("hyperband", {}),
    "schedule_aligned": ("schedule_aligned", {}),
    "schedule_aligned_lr_area": ("schedule_aligned", {"clock": "lr_area"}),
    "nearest_bound": ("nearest_bound", {}),
    "nearest_bound_eager": ("nearest_bound", {"decide_at_first_validation": True, "spare_catching_up": False}),
}


def load_curves(path: Path) -> dict:
    """{"max_steps", "max_warmup_ratio", "curves": [{"params": {...}, "points": [[step, lr_area, loss], ...]}]}."""
    return json.loads(Path(path).read_text())


def search_space() -> dict:
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf

    params = OmegaConf.load(ROOT / "conf" / "sweep" / "lora_search.yaml").hydra.sweeper.params
    space, _, _ = create_params_from_overrides([f"{key}={value}" for key, value in params.items()])
    return space


def coordinates(params: dict, space: dict) -> list[float]:
    """Params as a point of the unit cube, as the nearest-trial pruner measures distance."""
    from tunelab.sweep.pruning import unit_coordinate

    return [unit_coordinate(distribution, params[name]) for name, distribution in space.items()]


def nearest(curves: list[dict], params: dict, space: dict) -> dict:
    target = coordinates(params, space)
    return min(curves, key=lambda c: math.dist(coordinates(c["params"], space), target))


def build_sampler(name: str, seed: int):
    from hydra.utils import instantiate
    from hydra_plugins.hydra_optuna_sweeper.config import RandomSamplerConfig, TPESamplerConfig
    from omegaconf import OmegaConf

    if name == "gp":  # as conf/hydra/sweeper/sampler/gp.yaml builds it (hydra-optuna-sweeper has no config for it)
        import optuna

        return optuna.samplers.GPSampler(seed=seed)
    config = {"tpe": TPESamplerConfig, "random": RandomSamplerConfig}[name]
    return instantiate(OmegaConf.structured(config), seed=seed, _execution_whitelist_=["optuna.samplers.*"])


def build_pruner(name: str, recorded: dict):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tunelab.sweep.pruning import job_arguments

    config_name, overrides = PRUNERS[name]
    config = OmegaConf.load(ROOT / "conf" / "hydra" / "sweeper" / "pruner" / f"{config_name}.yaml")
    for key, value in overrides.items():
        config[key] = first_validation_after_warmup(recorded) if value == "first_validation_after_warmup" else value
    return instantiate(config, **job_arguments(config, recorded["max_steps"]),
                       _execution_whitelist_=["optuna.pruners.*", "tunelab.sweep.pruning.*"])


def first_validation_after_warmup(recorded: dict) -> int:
    warmup = recorded["max_warmup_ratio"] * recorded["max_steps"]
    return min(step for step, _, _ in recorded["curves"][0]["points"] if step >= warmup)


def reports(curve: dict, signal: str) -> list[tuple[int, float, float, int]]:
    """(step, lr_area, value reported, trial-steps spent so far) per validation of a curve: under a signal, its value
    at every validation but the last (which is the trial's own loss), a fork's steps charged from its first use."""
    points = curve["points"]
    if signal == "loss":
        return [(step, area, loss, step) for step, area, loss in points]
    values = dict(map(tuple, curve[signal]))
    fork_steps = curve.get("fork_steps", 0) if signal == "cooled" else 0
    out, forks = [], 0
    for index, (step, area, loss) in enumerate(points):
        last = index == len(points) - 1
        if not last and step in values:
            forks += 1
        value = loss if last or step not in values else values[step]
        out.append((step, area, value, step + forks * fork_steps))
    return out


def replay_sweep(recorded: dict, space: dict, sampler: str, pruner: str, seed: int, n_trials: int,
                 signal: str = "loss", pruned_trials: str = "optuna") -> dict:
    """One sweep: {"best": best objective of the complete trials, "trial_steps": steps trained over all trials,
    "trials": [(trial-steps, objective or inf) per trial, in order]}."""
    import optuna

    from tunelab.sweep.pruning import clock_step
    from tunelab.sweep.sampling import PrunedAsReported

    # Named: HyperbandPruner assigns brackets from a hash of the study name, and an unnamed study gets a random one.
    study = optuna.create_study(study_name=f"replay-{seed}", direction="minimize", pruner=build_pruner(pruner, recorded))
    on_lr_area = getattr(study.pruner, "clock", "step") == "lr_area"
    trials = []
    for number in range(n_trials):
        study.sampler = build_sampler(sampler, seed + number)
        if pruned_trials == "reported":
            study.sampler = PrunedAsReported(study.sampler)
        trial = study.ask(space)
        curve = nearest(recorded["curves"], trial.params, space)
        losses = [loss for _, _, loss in curve["points"]]
        reported, value = -1, math.inf
        for step, area, signal_value, spent in reports(curve, signal):
            reported = clock_step(area, reported) if on_lr_area else step
            trial.report(signal_value, reported)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:  # the objective is the best validation (tunelab.callbacks.ObjectiveTracker); NaN/inf fails the trial
            if math.isfinite(losses[-1]):
                value = min(losses)
                study.tell(trial, value)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trials.append((spent, value))
    return {"best": min(v for _, v in trials), "trial_steps": sum(s for s, _ in trials), "trials": trials}


def replay(recorded: dict, samplers=SAMPLERS, pruners=tuple(PRUNERS), seeds=range(10), n_trials: int = 20,
           signals=("loss",), pruned_trials=("optuna",)) -> dict:
    """{(sampler, pruner): [{"share": trial-steps / unpruned's, "regret": best / unpruned best - 1} per seed]}, a pruner
    fed another signal than the loss named "pruner@signal", "pruner@signal+reported" where the sampler sees pruned
    trials as complete with their last report (tunelab.sweep.sampling), and "first_K" for the unpruned sweep cut to
    its first K trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space()
    results = {}
    for sampler in samplers:
        for seed in seeds:
            unpruned = replay_sweep(recorded, space, sampler, "none", seed, n_trials)
            for count in (k for k in FEWER_TRIALS if k < n_trials):
                first = unpruned["trials"][:count]
                results.setdefault((sampler, f"first_{count}"), []).append({
                    "share": sum(s for s, _ in first) / unpruned["trial_steps"],
                    "regret": min(v for _, v in first) / unpruned["best"] - 1,
                })
            for pruner in pruners:
                variants = [(signal, told) for signal in signals for told in pruned_trials]
                for signal, told in variants if pruner != "none" else [("loss", "optuna")]:
                    run = unpruned if pruner == "none" else replay_sweep(recorded, space, sampler, pruner, seed,
                                                                         n_trials, signal, told)
                    name = (pruner if signal == "loss" else f"{pruner}@{signal}") + ("+reported" if told == "reported" else "")
                    results.setdefault((sampler, name), []).append({
                        "share": run["trial_steps"] / unpruned["trial_steps"],
                        "regret": run["best"] / unpruned["best"] - 1,
                    })
    return results


def replay_in_order(sweep: dict, space: dict, pruner: str, recorded: dict) -> dict:
    """One live unpruned sweep's trials, in order, each with its own curve: {"share", "regret"} under `pruner`."""
    import optuna

    study = optuna.create_study(study_name="live", direction="minimize", pruner=build_pruner(pruner, recorded))
    steps = 0
    for trial_record in sweep["trials"]:
        study.enqueue_trial(trial_record["params"])
        trial = study.ask(space)
        for step, loss in trial_record["points"]:
            trial.report(loss, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, trial_record["value"])
        steps += step
    best = min(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    return {"share": steps / sum(t["points"][-1][0] for t in sweep["trials"]),
            "regret": best / min(t["value"] for t in sweep["trials"]) - 1}


def live_table(live: dict, recorded: dict, pruners=tuple(PRUNERS)) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space()
    lines = ["| pruner | " + " | ".join(f"{s['sweep']}: trial-steps, regret" for s in live["sweeps"]) + " |",
             "|---" * (len(live["sweeps"]) + 1) + "|"]
    for pruner in pruners:
        runs = [replay_in_order(sweep, space, pruner, recorded) for sweep in live["sweeps"]]
        lines.append(f"| {pruner} | " + " | ".join(f"{r['share']:.0%}, {r['regret']:+.1%}" for r in runs) + " |")
    return "\n".join(lines)


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    pairs = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    return sum(sign(xs[i] - xs[j]) * sign(ys[i] - ys[j]) for i, j in pairs) / len(pairs)


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def rank_correlations(recorded: dict, signal: str = "loss") -> dict:
    """{("step" | "lr_area", rung): Kendall tau between the curves' `signal` at the rung and their final loss}; a signal
    only on the step clock, at the validations where the curves recorded it."""
    from tunelab.sweep.pruning import rung_steps, value_at

    curves = [c for c in recorded["curves"] if all(math.isfinite(p[2]) for p in c["points"])
              and (signal == "loss" or signal in c)]
    if not curves:
        return {}
    final = [c["points"][-1][2] for c in curves]
    if signal != "loss":
        taus = {}
        for step in sorted({step for step, _ in curves[0][signal]}):
            values = [dict(map(tuple, c[signal])).get(step) for c in curves]
            if None not in values and all(map(math.isfinite, values)):
                taus["step", step] = kendall_tau(values, final)
        return taus
    rungs = {"step": [step for step, _, _ in curves[0]["points"][:-1]],
             "lr_area": rung_steps(recorded["max_steps"], recorded["max_warmup_ratio"], 2, "lr_area")}
    taus = {}
    for clock, at in rungs.items():
        column = 0 if clock == "step" else 1
        for rung in at:
            losses = [value_at({p[column]: p[2] for p in c["points"]}, rung) for c in curves]
            if None not in losses:
                taus[clock, rung] = kendall_tau(losses, final)
    return taus


def by_learning_rate(recorded: dict) -> dict:
    """{learning rate: the curves recorded with it}, to read how a signal ranks within one learning rate."""
    groups = {}
    for curve in recorded["curves"]:
        groups.setdefault(curve["params"]["optim.lr"], []).append(curve)
    return {lr: {**recorded, "curves": curves} for lr, curves in sorted(groups.items())}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def table(results: dict) -> str:
    lines = ["| sampler | pruner | signal | trial-steps, median (IQR) | regret, median (IQR) |", "|---|---|---|---|---|"]
    for (sampler, name), runs in results.items():
        pruner, _, signal = name.partition("@")
        s1, s, s3 = quartiles([r["share"] for r in runs])
        r1, r, r3 = quartiles([r["regret"] for r in runs])
        lines.append(f"| {sampler} | {pruner} | {signal or 'loss'} | {s:.0%} ({s1:.0%}-{s3:.0%}) | "
                     f"{r:+.1%} ({r1:+.1%} to {r3:+.1%}) |")
    return "\n".join(lines)


def tau_table(recorded: dict, signals) -> str:
    """Kendall tau of each signal at each rung against the final loss: over all curves, then within each LR."""
    groups = {"all": recorded, **{f"lr={lr:g}": group for lr, group in by_learning_rate(recorded).items()}}
    columns = [(signal, clock, rung) for signal in signals for (clock, rung) in rank_correlations(recorded, signal)]
    lines = ["| curves | n | " + " | ".join(f"{signal} @{'area ' if clock == 'lr_area' else ''}{rung}"
                                             for signal, clock, rung in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for name, group in groups.items():
        taus = {signal: rank_correlations(group, signal) for signal in signals}
        cells = [taus[signal].get((clock, rung)) for signal, clock, rung in columns]
        lines.append(f"| {name} | {len(group['curves'])} | "
                     + " | ".join("-" if t is None else f"{t:+.2f}" for t in cells) + " |")
    return "\n".join(lines)


def short_runs_table(recorded: dict) -> str:
    """Kendall tau between complete-schedule runs of a fraction of the budget and the full runs' final loss."""
    curves = [c for c in recorded["curves"] if "short" in c and math.isfinite(c["points"][-1][2])]
    if not curves:
        return ""
    final = [c["points"][-1][2] for c in curves]
    lines = ["| complete schedule of | steps (trial-steps) | Kendall tau vs final loss |", "|---|---|---|"]
    for steps in sorted(curves[0]["short"], key=int):
        values = [c["short"][steps] for c in curves]
        if all(map(math.isfinite, values)):
            lines.append(f"| {int(steps) / recorded['max_steps']:.0%} of the budget | {steps} | "
                         f"{kendall_tau(values, final):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="?", type=Path, default=CURVES)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument("--signals", default="loss", help="comma-separated: loss, cooled, ema (where recorded)")
    parser.add_argument("--pruned-trials", default="optuna",
                        help="comma-separated: optuna (the sampler ranks pruned trials last), reported (as complete "
                             "with their last report: tunelab.sweep.sampling)")
    parser.add_argument("--live", type=Path, default=LIVE, help="unpruned live sweeps to replay in order")
    args = parser.parse_args(argv)
    if not args.curves.exists():
        sys.exit(f"tunelab: error: {args.curves} does not exist: record it with benchmarks/record_curves.py")
    recorded = load_curves(args.curves)
    samplers, pruners, signals = (args.samplers.split(","), args.pruners.split(","), args.signals.split(","))
    for name, given, known in (("sampler", samplers, SAMPLERS), ("pruner", pruners, PRUNERS),
                               ("signal", signals, SIGNALS)):
        if unknown := [g for g in given if g not in known]:
            sys.exit(f"tunelab: error: unknown {name} {unknown[0]}: pick from {', '.join(known)}")
    if missing := [s for s in signals if s != "loss" and not all(s in c for c in recorded["curves"])]:
        sys.exit(f"tunelab: error: {args.curves} has no {missing[0]} values: record them with "
                 "benchmarks/record_curves.py --signals")
    print(f"{len(recorded['curves'])} recorded curves of {recorded['max_steps']} steps; "
          f"{args.seeds} seeds x {args.trials} trials per sweep\n")
    from tunelab.sweep.sampling import PRUNED_TRIALS

    told = args.pruned_trials.split(",")
    if unknown := [t for t in told if t not in PRUNED_TRIALS]:
        sys.exit(f"tunelab: error: unknown --pruned-trials {unknown[0]}: pick from {', '.join(PRUNED_TRIALS)}")
    print(table(replay(recorded, samplers, pruners, range(args.seeds), args.trials, signals, told)))
    print("\n" + tau_table(recorded, signals))
    if short := short_runs_table(recorded):
        print("\n" + short)
    if args.live.exists():
        live = json.loads(args.live.read_text())
        print(f"\nLive unpruned sweeps replayed in order ({args.live.name}), each trial its own curve:\n")
        print(live_table(live, recorded))


if __name__ == "__main__":
    main(sys.argv[1:])
