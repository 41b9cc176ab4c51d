"""Session-scoped pytest fixtures that run real PostgreSQL and MLflow tracking servers.

Load with ``pytest_plugins = ["tests.services"]``. Each server listens on a free port of
127.0.0.1, keeps its state in a fresh temp dir, and is stopped (dir removed) after the session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_DATABASE = "tunelab_test"
POSTGRES_USER = "postgres"
POSTGRES_INSTALL_HINT = "run `make services` (or `apt-get install -y postgresql`)"
POSTGRES_START_TIMEOUT_S = 30
MLFLOW_START_TIMEOUT_S = 60
MLFLOW_STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_checked(cmd: list[str], cwd: Path, log: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        details = result.stdout + result.stderr
        if log is not None:
            details += f"\n--- {log} ---\n{log_tail(log)}"
        pytest.fail(f"`{' '.join(cmd)}` exited with {result.returncode}:\n{details}", pytrace=False)


def major_version(bin_dir: Path) -> int:
    return int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else -1


def postgres_bin_dir() -> Path:
    """Find initdb/pg_ctl/createdb; Debian keeps them off PATH in /usr/lib/postgresql/<major>/bin."""
    candidates = []
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    debian_dirs = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian_dirs, key=major_version, reverse=True)
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return bin_dir
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {POSTGRES_INSTALL_HINT}.",
                pytrace=False)


def postgres_owner_prefix() -> list[str]:
    """Command prefix to run server tools as a non-root user, since postgres refuses to run as root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        pytest.fail(f"No `{POSTGRES_USER}` system user to run the server as: {POSTGRES_INSTALL_HINT}.",
                    pytrace=False)
    return ["runuser", "-u", POSTGRES_USER, "--"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of an empty database on a throwaway PostgreSQL server."""
    bin_dir = postgres_bin_dir()
    as_owner = postgres_owner_prefix()
    # Not pytest's tmp_path: its parent dirs are 0700 root, which the postgres user can't enter.
    root = Path(tempfile.mkdtemp(prefix="tunelab-postgres-"))
    data_dir, log = root / "data", root / "server.log"
    pg_ctl = [*as_owner, str(bin_dir / "pg_ctl"), "--pgdata", str(data_dir)]
    port = free_port()
    try:
        if as_owner:
            shutil.chown(root, POSTGRES_USER, POSTGRES_USER)
        run_checked(
            [*as_owner, str(bin_dir / "initdb"), "--pgdata", str(data_dir), "--username", POSTGRES_USER,
             "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"],
            cwd=root,
        )
        # Durability is pointless for a throwaway server; dropping it makes commits much cheaper.
        server_options = (f"-h 127.0.0.1 -p {port} -k {root} "
                          "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run_checked(
            [*pg_ctl, "--log", str(log), "--options", server_options,
             "--wait", "--timeout", str(POSTGRES_START_TIMEOUT_S), "start"],
            cwd=root,
            log=log,
        )
        run_checked(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", POSTGRES_USER,
             POSTGRES_DATABASE],
            cwd=root,
        )
        yield f"postgresql+psycopg2://{POSTGRES_USER}@127.0.0.1:{port}/{POSTGRES_DATABASE}"
    finally:
        if (data_dir / "postmaster.pid").exists():
            subprocess.run([*pg_ctl, "--mode", "fast", "--wait", "stop"], cwd=root, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def wait_for_http(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"Server exited with {server.returncode} before {url} answered:\n{log_tail(log)}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s}s:\n{log_tail(log)}", pytrace=False)


def stop_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    # Reap whatever is left of the group (the uvicorn worker) even if `mlflow server` itself exited.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """Tracking URI of a throwaway MLflow server backed by SQLite, with proxied local artifacts."""
    root = Path(tempfile.mkdtemp(prefix="tunelab-mlflow-"))
    log = root / "server.log"
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        # The default of 4 uvicorn workers only slows start-up on a small CI machine.
        "--workers", "1",
    ]
    # Without this the server also spawns a Huey job runner with seven consumer processes
    # (for GenAI evaluation jobs) and leaves a temp dir in /dev/shm.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        with log.open("wb") as log_file:
            # Own process group, so teardown also stops the uvicorn child that `mlflow server` spawns.
            server = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                      stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{uri}/health", server, log, MLFLOW_START_TIMEOUT_S)
            yield uri
        finally:
            stop_process_group(server, MLFLOW_STOP_TIMEOUT_S)
    finally:
        shutil.rmtree(root, ignore_errors=True)
