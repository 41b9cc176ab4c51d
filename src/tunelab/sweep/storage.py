"""Opens the Optuna storage a study sweep keeps its trials in (an SQLAlchemy URL or an Optuna journal file), and
tells whether the worker process recorded on a trial is gone."""

import functools
import os
import socket
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


def this_worker() -> dict:
    """This sweep process as a trial records it: where it runs, its pid, and when it started (pids are reused)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": pid, "started": process_stat(pid)[1]}


def worker_is_gone(worker: dict) -> bool:
    """True only when the process a this_worker() record names has certainly ended: it ran in this machine's pid
    namespace, and its pid is now free, a zombie's, or another process's (one that started at another moment)."""
    if (worker.get("host"), worker.get("pid_namespace")) != (socket.gethostname(), pid_namespace()):
        return False  # another machine or container: only its heartbeat can tell
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a live process of another user
    state, started = process_stat(worker["pid"])
    return state in ("Z", "X") or (started is not None and started != worker.get("started"))


def process_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat; (None, None) where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces and parentheses
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


@functools.cache
def pid_namespace() -> str | None:
    """This boot's id and pid namespace (Linux): pids compare only within one, and containers that share a host name
    or a host that rebooted do not share it. None where there is no /proc."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + " " + os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
