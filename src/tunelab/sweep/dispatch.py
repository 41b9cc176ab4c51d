"""Trials in flight: a sweep keeps up to `hydra.sweeper.n_jobs` of them running and hears of each the moment it ends,
so that the next one is asked for and started while the others still run. A batch held every slot until its longest
trial ended, so a trial that was pruned early, failed or simply trained less left its GPUs or its SLURM allocation
idle (issue 34; hydra-optuna-sweeper has the same limit, facebookresearch/hydra#3091).

Hydra's Launcher API has one call, launch(batch), which returns once every job of the batch has ended. Each trial is
launched here as a batch of one, from a thread of its own, which blocks in that call; the sweep process itself waits
for whichever trial ends first. That needs a launcher whose launch() may run in several threads at once and starts
each job outside this process: tunelab's torchrun and SLURM launchers say so (`concurrent_launches = True`). Any
other launcher, Hydra's default in-process one first, runs one trial at a time in this thread: Lightning, Hydra's job
set-up (working directory, logging) and signal handlers belong to the process, not to a thread.
"""

import logging
import queue
import threading
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)


def trials_at_once(launcher, n_jobs: int) -> int:
    """n_jobs where the launcher can hold that many trials in flight, else 1 (said once)."""
    if n_jobs > 1 and not getattr(launcher, "concurrent_launches", False):
        name = type(launcher).__name__
        log.warning("hydra.sweeper.n_jobs=%d: %s runs each trial inside this process, so trials run one at a time; "
                    "hydra/launcher=torchrun (CPU processes or the GPUs of this node) or hydra/launcher=slurm keep "
                    "n_jobs trials running", n_jobs, name)
        return 1
    return n_jobs


class Launches:
    """Trials launched one by one, each reported back by `next_ended()` as soon as it has ended. With `threads`,
    each trial's launch() runs in a daemon thread (a sweep that is interrupted exits without waiting for trials it
    has already recorded as interrupted); without, it runs to its end in start()."""

    def __init__(self, launcher, threads: bool):
        self.launcher = launcher
        self.threads = threads
        self.ended: queue.Queue = queue.Queue()

    def start(self, trial, overrides: Sequence[str]) -> None:
        if self.threads:
            threading.Thread(target=self.run, args=(trial, overrides), name=f"trial-{trial.number}", daemon=True).start()
        else:
            self.run(trial, overrides)

    def run(self, trial, overrides: Sequence[str]) -> None:
        # The job number is the trial number: it names the job's dir and lets the job re-open its trial.
        try:
            (result,) = self.launcher.launch([list(overrides)], initial_job_idx=trial.number)
        except Exception as error:  # the launch itself failed (a submission refused, ...): the trial fails with it
            result = JobReturn(status=JobStatus.FAILED, _return_value=error)
        self.ended.put((trial, result))

    def next_ended(self) -> tuple:
        """(trial, JobReturn) of the next trial to end; blocks until one has."""
        return self.ended.get()
