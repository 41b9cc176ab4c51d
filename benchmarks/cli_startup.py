"""How long the command line takes to answer (issue 13): `train.py --help` and a config error against
`python -c "import lightning"`, median wall time of N runs of each, on this machine. Target: both under 0.3x.

    python benchmarks/cli_startup.py [--runs 9]      (make bench-cli)

The commands run in turn, round after round, so a change of load on the machine touches all of them alike; the load
average is printed before and after, since other work on the machine inflates every figure.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.3


def commands(run_dir: str) -> dict[str, tuple[list[str], bool]]:
    """name -> (command, whether it ends with a config error); the first is the baseline."""
    python = sys.executable
    return {
        'python -c "import lightning"': ([python, "-c", "import lightning"], False),
        "python train.py --help": ([python, "train.py", "--help"], False),
        "python train.py optim.lr=-1": ([python, "train.py", "optim.lr=-1", f"hydra.run.dir={run_dir}"], True),
    }


def wall_seconds(command: list[str], config_error: bool) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if (result.returncode != 0) != config_error or (config_error and "tunelab: error:" not in result.stderr):
        raise SystemExit(f"{' '.join(command)} did not do what it is timed for (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (default 9)")
    runs = parser.parse_args().runs

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as run_dir:
        timed = commands(run_dir)
        times = {name: [] for name in timed}
        for _ in range(runs):
            for name, (command, config_error) in timed.items():
                times[name].append(wall_seconds(command, config_error))
    load_after = os.getloadavg()

    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "lightning", "hydra-core", "omegaconf"))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, {packages}")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {', '.join(f'{x:.2f}' for x in load_after)}")
    print(f"{'command':<32} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio':>7}   ({runs} runs each)")
    baseline = statistics.median(next(iter(times.values())))
    for name, seconds in times.items():
        median = statistics.median(seconds)
        ratio = median / baseline
        verdict = "" if name.endswith('lightning"') else ("  < 0.3: met" if ratio < TARGET else "  >= 0.3: missed")
        print(f"{name:<32} {median:>9.2f} {min(seconds):>7.2f} {max(seconds):>7.2f} {ratio:>6.2f}x{verdict}")


if __name__ == "__main__":
    main()
