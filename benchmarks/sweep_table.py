"""Prints the sweep-efficiency table: per pruner, best objective and trial-steps (the last step each trial reached).

Usage: python benchmarks/sweep_table.py <workdir> <pruner> [<pruner> ...]
"""

import sys
from collections import Counter
from pathlib import Path

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(work: Path, pruners: list[str]) -> None:
    storage = f"sqlite:///{work / 'optuna.db'}"
    rows, reference = [], None
    for pruner in pruners:
        trials = optuna.load_study(study_name=f"bench-{pruner}", storage=storage).trials
        states = Counter(t.state.name for t in trials)
        best = min(t.value for t in trials if t.state.name == "COMPLETE")
        steps = sum(max(t.intermediate_values, default=0) for t in trials)
        seconds = float((work / f"{pruner}.seconds").read_text()) if (work / f"{pruner}.seconds").exists() else float("nan")
        reference = reference or (best, steps)
        rows.append(f"| {pruner} | {states['COMPLETE']} / {states['PRUNED']} / {states['FAIL']} | {best:.4f} "
                    f"({100 * (best / reference[0] - 1):+.1f}%) | {steps} ({100 * steps / reference[1]:.0f}%) | {seconds:.0f} |")
    print("| pruner | trials complete / pruned / failed | best val/loss (vs first) | trial-steps (vs first) | wall s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
