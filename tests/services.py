"""Session-scoped pytest fixtures that run real PostgreSQL and MLflow tracking servers and a single-node SLURM cluster.

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
from dataclasses import dataclass
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


SLURM_INSTALL_HINT = "run `make services` (or `apt-get install -y slurmd slurmctld slurm-client munge`)"
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
SLURM_START_TIMEOUT_S = 30
SLURM_STOP_TIMEOUT_S = 30
SLURM_PARTITION = "debug"
# More CPUs than a 2-core CI machine has (config_overrides): a 2-task DDP job and array jobs side by side must fit.
SLURM_CPUS = 8


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    partition: str
    root: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that points SLURM's commands (and the jobs they start) at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{log_tail(self.root / name)}"
                         for name in ("slurmctld.log", "slurmd.log", "munged.log"))


def slurm_conf(root: Path, host: str, munge_socket: Path, controller_port: int, node_port: int) -> str:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=tunelab-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
# No cgroups in a container: track processes by parent id, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# The scheduler looks every second (default 60 s), so a requeued job starts again within seconds.
SchedulerParameters=sched_interval=1,bf_interval=1
# A cancelled job's tasks get SIGKILL 5 s after SIGTERM (default 30 s).
KillWait=5
# No accounting storage, as on a cluster without slurmdbd: sacct has nothing to say.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={SLURM_CPUS} RealMemory={memory_mb} State=UNKNOWN
PartitionName={SLURM_PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_daemon(command: list[str], cluster: SlurmCluster) -> subprocess.Popen:
    """A daemon in the foreground, so the fixture owns its process; it writes its own log into the cluster's dir."""
    return subprocess.Popen(command, cwd=cluster.root, env=cluster.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_daemon(daemon: subprocess.Popen, timeout_s: float) -> None:
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(timeout_s)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def wait_for_idle_node(cluster: SlurmCluster, daemons: list[subprocess.Popen], timeout_s: float) -> None:
    deadline, state = time.monotonic() + timeout_s, "(no answer)"
    while time.monotonic() < deadline:
        if any(d.poll() is not None for d in daemons):
            break
        answer = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=cluster.env, capture_output=True, text=True)
        state = answer.stdout.strip() or answer.stderr.strip()
        if state == "idle":
            return
        time.sleep(0.2)
    exits = ", ".join(f"{' '.join(d.args[:1])} exited {d.returncode}" for d in daemons if d.poll() is not None)
    pytest.fail(f"SLURM's node is not idle after {timeout_s}s ({exits or f'sinfo: {state}'}):\n{cluster.log_tails()}",
                pytrace=False)


def cancel_every_job(cluster: SlurmCluster, timeout_s: float) -> None:
    """Cancels what the tests left and waits for its processes to end: slurmd leaves running jobs behind when it stops."""
    subprocess.run(["scancel", "--full", f"--partition={cluster.partition}"], env=cluster.env, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = subprocess.run(["squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING,REQUEUED,SUSPENDED"],
                              env=cluster.env, capture_output=True, text=True)
        if left.returncode != 0 or not left.stdout.strip():
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A single-node SLURM cluster on 127.0.0.1: its own munged, slurmctld and slurmd on free ports, all state in a temp
    dir, no accounting storage. Skips where it cannot run: the daemons need root and Debian's slurm-wlm and munge."""
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root (slurmd starts jobs as their users)")
    if missing := [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} not found): {SLURM_INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="tunelab-slurm-"))
    # munged refuses a socket whose directory others cannot enter, and a key that others could read.
    root.chmod(0o755)
    key_dir = root / "munge-key"
    key_dir.mkdir(mode=0o700)
    key = key_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for name in ("state", "spool"):
        (root / name).mkdir()
    munge_socket = root / "munge.socket"
    # The node is this host by name: Lightning's SLURM environment resolves the job's node name as the DDP master.
    host = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(conf=root / "slurm.conf", partition=SLURM_PARTITION, root=root)
    cluster.conf.write_text(slurm_conf(root, host, munge_socket, free_port(), free_port()))
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(start_daemon(
            ["munged", "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
             f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
             f"--seed-file={root / 'munged.seed'}"], cluster))
        deadline = time.monotonic() + SLURM_START_TIMEOUT_S
        while not munge_socket.exists() and daemons[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons.append(start_daemon(["slurmctld", "-D", "-i"], cluster))
        daemons.append(start_daemon(["slurmd", "-D", "-N", host], cluster))
        wait_for_idle_node(cluster, daemons, SLURM_START_TIMEOUT_S)
        yield cluster
    finally:
        if len(daemons) == 3 and daemons[1].poll() is None:
            cancel_every_job(cluster, SLURM_STOP_TIMEOUT_S)
        for daemon in reversed(daemons):  # slurmd, slurmctld, then munged, which both talk to
            stop_daemon(daemon, SLURM_STOP_TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)
