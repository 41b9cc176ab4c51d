"""Replays LoRA sweeps offline on recorded validation curves, to measure pruners honestly (issue 14).

Every curve was recorded once, to its full step budget (benchmarks/record_curves.py). A replayed sweep is an in-memory
Optuna study over the search space of conf/sweep/lora_search.yaml, with the sampler and pruner configs the sweeper
ships: the sampler proposes (trial k seeded with seed + k, as the sweeper does), the nearest recorded configuration
answers with its curve, the pruner decides at each validation. Per sampler x pruner, over seeds: the share of
trial-steps spent and the regret of the best found against the unpruned sweep of the same sampler and seed (median and
interquartile range); and how well a validation ranks the configurations by their final loss (Kendall tau), on the
raw-step clock at each validation and on the LR-area clock at the schedule-aligned rungs.

The replay snaps each proposal to the nearest recorded configuration, so two trials that snap alike share one curve
exactly, which flatters a pruner that projects a trial by its neighbour's curve. The live sweeps' table has no such
snapping: unpruned sweeps run live (benchmarks/sweep_efficiency.sh), replayed in their own order with their own curves
(the params as proposed), each pruner deciding as they come; there only pruning differs, the proposals stay.

Usage: python benchmarks/pruning_replay.py [curves.json] [--seeds 10] [--trials 20] [--live benchmarks/live_sweeps.json]
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
SAMPLERS = ("tpe", "random")
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


def replay_sweep(recorded: dict, space: dict, sampler: str, pruner: str, seed: int, n_trials: int) -> dict:
    """One sweep: {"best": best objective of the complete trials, "trial_steps": steps trained over all trials}."""
    import optuna

    from tunelab.sweep.pruning import clock_step

    # Named: HyperbandPruner assigns brackets from a hash of the study name, and an unnamed study gets a random one.
    study = optuna.create_study(study_name=f"replay-{seed}", direction="minimize", pruner=build_pruner(pruner, recorded))
    on_lr_area = getattr(study.pruner, "clock", "step") == "lr_area"
    trial_steps = 0
    for number in range(n_trials):
        study.sampler = build_sampler(sampler, seed + number)
        trial = study.ask(space)
        points = nearest(recorded["curves"], trial.params, space)["points"]
        reported = -1
        for step, area, loss in points:
            reported = clock_step(area, reported) if on_lr_area else step
            trial.report(loss, reported)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:  # the objective is the best validation (tunelab.callbacks.ObjectiveTracker); NaN/inf fails the trial
            if math.isfinite(points[-1][2]):
                study.tell(trial, min(loss for _, _, loss in points))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trial_steps += step
    complete = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"best": min(complete, default=math.inf), "trial_steps": trial_steps}


def replay(recorded: dict, samplers=SAMPLERS, pruners=tuple(PRUNERS), seeds=range(10), n_trials: int = 20) -> dict:
    """{(sampler, pruner): [{"share": trial-steps / unpruned's, "regret": best / unpruned best - 1} per seed]}."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space()
    results = {}
    for sampler in samplers:
        for seed in seeds:
            unpruned = replay_sweep(recorded, space, sampler, "none", seed, n_trials)
            for pruner in pruners:
                run = unpruned if pruner == "none" else replay_sweep(recorded, space, sampler, pruner, seed, n_trials)
                results.setdefault((sampler, pruner), []).append({
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


def rank_correlations(recorded: dict) -> dict:
    """{("step" | "lr_area", rung): Kendall tau between the curves' loss at the rung and their final loss}."""
    from tunelab.sweep.pruning import rung_steps, value_at

    curves = [c["points"] for c in recorded["curves"] if all(math.isfinite(p[2]) for p in c["points"])]
    final = [points[-1][2] for points in curves]
    rungs = {"step": [step for step, _, _ in curves[0][:-1]],
             "lr_area": rung_steps(recorded["max_steps"], recorded["max_warmup_ratio"], 2, "lr_area")}
    taus = {}
    for clock, at in rungs.items():
        column = 0 if clock == "step" else 1
        for rung in at:
            losses = [value_at({p[column]: p[2] for p in points}, rung) for points in curves]
            if None not in losses:
                taus[clock, rung] = kendall_tau(losses, final)
    return taus


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def table(results: dict, taus: dict) -> str:
    lines = ["| sampler | pruner | trial-steps, median (IQR) | regret, median (IQR) |", "|---|---|---|---|"]
    for (sampler, pruner), runs in results.items():
        s1, s, s3 = quartiles([r["share"] for r in runs])
        r1, r, r3 = quartiles([r["regret"] for r in runs])
        lines.append(f"| {sampler} | {pruner} | {s:.0%} ({s1:.0%}-{s3:.0%}) | {r:+.1%} ({r1:+.1%} to {r3:+.1%}) |")
    lines += ["", "| clock | rung | Kendall tau (rung loss vs final loss) |", "|---|---|---|"]
    lines += [f"| {clock} | {rung} | {tau:+.2f} |" for (clock, rung), tau in taus.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="?", type=Path, default=CURVES)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--live", type=Path, default=LIVE, help="unpruned live sweeps to replay in order")
    args = parser.parse_args(argv)
    if not args.curves.exists():
        sys.exit(f"tunelab: error: {args.curves} does not exist: record it with benchmarks/record_curves.py")
    recorded = load_curves(args.curves)
    print(f"{len(recorded['curves'])} recorded curves of {recorded['max_steps']} steps; "
          f"{args.seeds} seeds x {args.trials} trials per sweep\n")
    print(table(replay(recorded, seeds=range(args.seeds), n_trials=args.trials), rank_correlations(recorded)))
    if args.live.exists():
        live = json.loads(args.live.read_text())
        print(f"\nLive unpruned sweeps replayed in order ({args.live.name}), each trial its own curve:\n")
        print(live_table(live, recorded))


if __name__ == "__main__":
    main(sys.argv[1:])
