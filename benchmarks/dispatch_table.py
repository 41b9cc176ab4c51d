"""Prints the slot-occupancy table of benchmarks/sweep_dispatch.sh: per dispatch mode, the sweep's wall time, the
trials' outcomes and best value, and how busy its 2 slots were.

Busy slot-seconds come from the trials themselves (tunelab.sweep.trial: each trial's process start to its training's
end), not from the study's ask and tell times, which a batch stretches to its longest trial. Occupancy is
busy / (slots x wall), over the trials' span (first start to last end: what dispatch decides) and over the sweep
command's whole wall time (which adds the sweep's own start-up, its first ask and the summary).

Usage: python benchmarks/dispatch_table.py <workdir> <mode> [<mode> ...]
"""

import sys
from collections import Counter
from pathlib import Path

import optuna

from tunelab.sweep.summary import slot_occupancy

optuna.logging.set_verbosity(optuna.logging.WARNING)
SLOTS = 2


def main(work: Path, modes: list[str]) -> None:
    storage = f"sqlite:///{work / 'optuna.db'}"
    print("| dispatch | trials complete / pruned / failed | best val/loss | trial-steps | sweep wall s | trials' span s "
          "| busy slot-s | occupancy (span) | occupancy (sweep wall) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        trials = optuna.load_study(study_name=f"dispatch-{mode}", storage=storage).trials
        states = Counter(t.state.name for t in trials)
        best = min(t.value for t in trials if t.state.name == "COMPLETE")
        steps = sum(max(t.intermediate_values, default=0) for t in trials)
        seconds = float((work / f"{mode}.seconds").read_text())
        occupancy, span = slot_occupancy(trials, SLOTS)
        busy = occupancy * SLOTS * span
        print(f"| {mode} | {states['COMPLETE']} / {states['PRUNED']} / {states['FAIL']} | {best:.4f} | {steps} "
              f"| {seconds:.0f} | {span:.0f} | {busy:.0f} | {occupancy:.2f} | {busy / (SLOTS * seconds):.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
