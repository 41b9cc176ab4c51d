"""Job states for hydra/launcher=slurm on a cluster that keeps no accounting (no slurmdbd): from squeue, not sacct.

submitit asks `sacct` for the state of its jobs. Where SLURM keeps no accounting, sacct fails at every poll; submitit
logs "Bypassing sacct error ..., status may be inaccurate" (three copies through its two handlers and Hydra's) and
knows no state at all: it waits for the result file, so a job that ended without one (cancelled, killed at its time
limit, out of memory) was waited for forever. Here the first poll asks sacct once; where accounting is disabled, one
line says so and every poll asks `squeue` instead, whose states name such an ending.
"""

import getpass
import logging
import subprocess
import threading

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

NO_ACCOUNTING = "accounting storage is disabled"  # sacct's answer where AccountingStorageType=accounting_storage/none
SQUEUE_FIELDS = "%i|%T|%N"  # squeue's JobID, State (long form, as sacct's) and NodeList, '|'-separated as sacct's
# squeue keeps an ended job for MinJobAge (300 s by default) only: one of ours that it no longer lists has ended.
LEFT_QUEUE = "LEFT_QUEUE"
# States in which a job has ended for good. Others (PENDING, CONFIGURING, COMPLETING, REQUEUED, SUSPENDED, PREEMPTED
# before its requeue, ...) are still on the way to one; a requeued job keeps its id and its place in squeue.
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "REVOKED", LEFT_QUEUE}


class SlurmJobStates(SlurmInfoWatcher):
    """submitit's watcher of its SLURM jobs (polls sacct), which polls squeue instead where sacct has no accounting."""

    def __init__(self, delay_s: int = 600):
        super().__init__(delay_s)
        self.source: str | None = None  # "sacct" or "squeue", decided at the first poll
        self.polled: set[str] = set()
        # A study sweep waits on each trial's job from a thread of its own; submitit's watcher is not thread-safe
        # (a job registered during a poll changes the set the poll iterates over).
        self.lock = threading.RLock()

    def register_job(self, job_id: str) -> None:
        with self.lock:
            super().register_job(job_id)

    def update(self) -> None:
        with self.lock:
            super().update()

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or self.source == "sacct":
            return command
        if self.source is None:
            self.source = "squeue" if accounting_disabled(command) else "sacct"
            if self.source == "sacct":
                return command
        self.polled = self._registered - self._finished
        return ["squeue", f"--user={getpass.getuser()}", "--states=all", "--noheader", f"--format={SQUEUE_FIELDS}"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self.source != "squeue":
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)
        for job_id in self.polled - info.keys():
            info[job_id] = {"JobID": job_id, "State": LEFT_QUEUE, "NodeList": ""}
        return info

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        if self.source != "squeue":
            return super().is_done(job_id, mode)
        return self.get_state(job_id, mode).split()[0] in ENDED


def accounting_disabled(sacct_command: list[str]) -> bool:
    """Runs submitit's sacct command once; True (logged once) where SLURM answers that it keeps no accounting. Any
    other failure is left to submitit, which goes on asking sacct and warns each time: a real problem to show."""
    try:
        answer = subprocess.run(sacct_command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if answer.returncode == 0 or NO_ACCOUNTING not in answer.stderr.lower():
        return False
    log.info("SLURM keeps no job accounting (sacct: %s): job states come from squeue instead", answer.stderr.strip())
    return True


def watch_with_squeue_fallback() -> None:
    """Makes this process's submitit SLURM jobs use SlurmJobStates. submitit's jobs share one watcher, the job class's
    own (SlurmJob.watcher), and hydra-submitit-launcher builds its executor inside launch(), so the class's is the one
    place to set it; idempotent."""
    if not isinstance(SlurmJob.watcher, SlurmJobStates):
        SlurmJob.watcher = SlurmJobStates(delay_s=SlurmJob.watcher._delay_s)
