"""Trials whose worker died: found (a gone process on this machine, or a lapsed heartbeat), failed, and queued to run
again from their last checkpoint; and the heartbeat that tells a live worker's trials from a dead one's."""

import logging
import threading
from pathlib import Path

import optuna

from tunelab.sweep.storage import trial_id, worker_is_gone
from tunelab.sweep.trial import REPLACES_ATTR, RUN_DIR_ATTR

log = logging.getLogger(__name__)

WORKER_ATTR = "tunelab:worker"  # system attr: the sweep process running the trial (storage.this_worker)


class LostTrials:
    """Fails the running trials of dead workers and queues their params for the next trial asked (by any worker),
    which takes the lost trial's place in n_trials and resumes from its last checkpoint (resume_overrides).
    `study`, `storage` and `run_log` are set once the study is open (the storage needs on_stale_trial first)."""

    def __init__(self, grace_period: int):
        self.grace_period = grace_period
        self.study = self.storage = self.run_log = None

    def fail(self) -> None:
        """Fails the running trials whose worker died: at once where it ran on this machine and its process is gone,
        else once its heartbeat is older than grace_period (fail_stale_trials, which calls on_stale_trial)."""
        optuna.storages.fail_stale_trials(self.study)
        TrialState = optuna.trial.TrialState
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.system_attrs.get(WORKER_ATTR)
            if worker is None or not worker_is_gone(worker):
                continue
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker of this machine failed it first
            reason = f"its process {worker['pid']} on {worker['host']} is gone"
            self.lost(self.storage.get_trial(trial._trial_id), reason)

    def on_stale_trial(self, study, trial) -> None:
        self.lost(trial, f"no heartbeat for {self.grace_period}s")

    def lost(self, trial, reason: str) -> None:
        log.warning("trial %d lost its worker (%s): failed, a later trial re-runs its params", trial.number, reason)
        if self.run_log is not None:
            self.run_log.record_trial(trial)
        self.queue_rerun(trial)

    def queue_rerun(self, trial) -> None:
        self.study.enqueue_trial(trial.params, user_attrs={REPLACES_ATTR: trial.number})

    def resume_overrides(self, trial) -> dict:
        """{ckpt_path: ...} for a trial that re-runs a lost one which left a last checkpoint this machine can read."""
        if (number := trial.user_attrs.get(REPLACES_ATTR)) is None:
            return {}
        lost = self.storage.get_trial(trial_id(self.storage, self.study.study_name, number))
        if (run_dir := lost.user_attrs.get(RUN_DIR_ATTR)) is None:
            return {}
        checkpoint = Path(run_dir, "checkpoints", "last.ckpt")  # where the default callbacks keep it
        if not checkpoint.exists():
            return {}
        log.info("trial %d re-runs trial %d from its checkpoint %s", trial.number, number, checkpoint)
        return {"ckpt_path": "'" + str(checkpoint).replace("'", "\\'") + "'"}  # quoted: a path may hold = or ,


class Heartbeat:
    """Beats for this worker's running trials, so other workers can tell them from trials of a dead worker."""

    def __init__(self, storage, interval: int):
        self.storage = storage
        self.interval = interval
        self.enabled = isinstance(storage, optuna.storages.RDBStorage) and bool(interval)
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()
        if self.enabled:
            threading.Thread(target=self.run, name="optuna-heartbeat", daemon=True).start()

    def add(self, trial) -> None:
        if self.enabled:
            self.trial_ids.add(trial._trial_id)
            self.storage.record_heartbeat(trial._trial_id)

    def remove(self, trial) -> None:
        self.trial_ids.discard(trial._trial_id)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for trial_id in list(self.trial_ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a lost beat only risks a late stale mark; keep the sweep going
                    log.warning("heartbeat of trial id %d not recorded: %s", trial_id, error)

    def stop(self) -> None:
        self.stopped.set()
