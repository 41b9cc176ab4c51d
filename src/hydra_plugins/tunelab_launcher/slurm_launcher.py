"""hydra/launcher=slurm: hydra-submitit-launcher's SLURM launcher, whose jobs' states come from squeue where the
cluster keeps no accounting (tunelab.slurm_status), and which tunelab's study sweeper calls from several threads at
once, a job for each trial, submitted the moment a slot frees (tunelab.sweep.dispatch)."""

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # the optional extra tunelab[slurm]; Hydra imports every plugin module at each start
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        # Each launch() builds its own executor and waits on its own jobs; the job states all jobs of this process
        # share are polled under a lock (tunelab.slurm_status.SlurmJobStates).
        concurrent_launches = True

        def __init__(self, **params: Any) -> None:
            super().__init__(**params)
            tasks = self.params["tasks_per_node"]
            if not (isinstance(tasks, int) and tasks >= 1):
                sys.exit(f"tunelab: error: hydra/launcher=slurm starts one task per device: give trainer.devices as a "
                         f"number of devices (or auto), not {tasks}")

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from tunelab.slurm_status import watch_with_squeue_fallback

            watch_with_squeue_fallback()
            return super().launch(job_overrides, initial_job_idx)
