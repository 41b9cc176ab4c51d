"""hydra/launcher=slurm: hydra-submitit-launcher's SLURM launcher, whose jobs' states come from squeue where the
cluster keeps no accounting (tunelab.slurm_status)."""

from collections.abc import Sequence

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # the optional extra tunelab[slurm]; Hydra imports every plugin module at each start
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from tunelab.slurm_status import watch_with_squeue_fallback

            watch_with_squeue_fallback()
            return super().launch(job_overrides, initial_job_idx)
