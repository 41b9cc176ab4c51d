"""Opens the Optuna storage a study sweep keeps its trials in: an SQLAlchemy URL or an Optuna journal file."""

from pathlib import Path

import optuna
from sqlalchemy.engine import make_url


def open_storage(location: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 on_stale_trial=None):
    """`location` with `://` is an SQLAlchemy URL (sqlite, postgresql, mysql); anything else is a journal file path.

    With a heartbeat, a trial whose worker died (kill -9, lost machine) turns stale after `grace_period` seconds and
    is failed by the next worker that looks (which then calls `on_stale_trial(study, trial)`), so a killed sweep
    does not hold its trial RUNNING forever.
    """
    if "://" not in location:
        path = Path(location).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    url = make_url(location)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(location, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                      heartbeat_stale_trial_callback=on_stale_trial)


def public_location(location: str) -> str:
    """The storage location as it may be shown in logs and MLflow: without a password."""
    if "://" not in location:
        return location
    return make_url(location).render_as_string(hide_password=True)


def trial_id(storage, study_name: str, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
