"""A Hydra launcher that runs every sweep trial as its own single-run distributed job under torchrun (a trial of one
rank as a plain process).

Lightning starts the ranks of a multi-device run by re-executing `sys.argv` (Lightning #11300), so under `-m` each
extra rank would start a sweep of its own. Here the sweep stays in this process, and each trial becomes
`torchrun --standalone --nproc-per-node N train.py <trial overrides> hydra.run.dir=<trial dir>`: a plain run in which
torchrun has already started every rank, so Lightning starts none. The trial's objective is read back from the
`objective.json` its rank 0 writes.

Trials share the node through `Slots`: with GPUs, a trial of k ranks takes k free GPUs (CUDA_VISIBLE_DEVICES) and
gives them back when it ends, so trials of different sizes run side by side; on CPU, a trial takes one of
`max_parallel` (else the sweeper's n_jobs) slots and its ranks talk over gloo. launch() may run in several threads at
once, one trial each: that is how tunelab's study sweeper keeps n_jobs trials in flight (tunelab.sweep.dispatch).
Each rank gets the CPU threads of its share of the node's cores, never torch's default of one per core: two trial
processes on 2 cores each starting 2 threads ran 7x slower than with one thread each (issue 34).
"""

import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

OBJECTIVE_FILE = "objective.json"
LOG_FILE = "torchrun.log"


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.tunelab_launcher.torchrun_launcher.TorchrunLauncher"
    # Processes per trial; null: the trial's own device count (strategy devices or trainer.devices).
    nproc_per_node: Any = None
    # Trials at once; null: as many as the GPUs hold side by side, and on CPU the sweeper's n_jobs (else one).
    max_parallel: Any = None
    # The entry script each trial runs; null: the one this sweep was started with.
    script: Any = None


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="tunelab")


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def trial_processes(cfg: DictConfig, gpus: int) -> int:
    """How many ranks the trial's own config asks for on this node."""
    from tunelab.strategy import strategy_accelerator, strategy_devices

    devices = strategy_devices(cfg.strategy, cfg.trainer)
    on_gpu = strategy_accelerator(cfg.strategy, cfg.trainer) in ("gpu", "cuda", "auto") and gpus > 0
    if devices in ("auto", -1, "-1"):
        return gpus if on_gpu else 1
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    return devices if isinstance(devices, int) else len(devices)


def forwarded_hydra_overrides(cfg: DictConfig) -> list[str]:
    """The sweep's own `hydra...` overrides (sweeper settings, verbosity) that a trial job still needs; the launcher
    and the run/sweep directories are this launcher's business. Read them from the sweep's config: a trial's config
    from load_sweep_config has them no more."""
    ours = ("hydra/launcher=", "hydra.launcher.", "hydra.sweep.", "hydra.run.", "hydra.mode=", "hydra.job.num=",
            "hydra.job.id=")  # "hydra.sweep." keeps hydra.sweeper.* (storage, study name), which trials need
    return [o for o in cfg.hydra.overrides.hydra if not o.lstrip("+~").startswith(ours)]


def first_error_line(log_text: str) -> str:
    """The line that says why a trial died, rather than torchrun's summary of which rank did."""
    lines = [line.removeprefix("[rank0]: ").strip() for line in log_text.splitlines()]
    errors = [line for line in lines if line.startswith("tunelab: error:")
              or re.match(r"^[\w.]+(Error|Exception): ", line) and "ChildFailedError" not in line]
    return errors[0] if errors else next((line for line in reversed(lines) if line), "no output")


def read_objective(trial_dir: Path) -> float:
    return float(json.loads((trial_dir / OBJECTIVE_FILE).read_text())["objective"])


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


class Slots:
    """What the trials of a launcher share, lent in the order they ask: the node's GPUs (a trial of k ranks takes k),
    or on CPU one slot a trial. A trial waits until enough is free and no earlier trial still waits, so a trial of
    many GPUs is not passed over for ever by smaller ones."""

    def __init__(self, items: list[str]):
        self.free = list(items)
        self.queue: deque = deque()
        self.changed = threading.Condition()

    def take(self, count: int) -> list[str]:
        with self.changed:
            turn = object()
            self.queue.append(turn)
            self.changed.wait_for(lambda: self.queue[0] is turn and len(self.free) >= count)
            self.queue.popleft()
            taken, self.free = self.free[:count], self.free[count:]
            self.changed.notify_all()
            return taken

    def give_back(self, items: list[str]) -> None:
        with self.changed:
            self.free += items
            self.changed.notify_all()


@dataclass
class Trial:
    num: int
    overrides: list[str]
    cfg: DictConfig
    directory: Path
    processes: int
    gpus: list[str]
    process: subprocess.Popen | None = None
    refused: str | None = None  # why it was not started


class TorchrunLauncher(Launcher):
    concurrent_launches = True  # launch() may run in several threads at once (tunelab.sweep.dispatch)

    def __init__(self, nproc_per_node: int | None = None, max_parallel: int | None = None, script: str | None = None):
        self.nproc_per_node = nproc_per_node
        self.max_parallel = max_parallel
        self.script = script
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.preparing = threading.Lock()  # Hydra's config loading and its HydraConfig singleton are per process

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.gpus = visible_gpus()
        if self.gpus:
            self.slots = Slots(self.gpus)
            self.cpu_trials = 0
            processes = self.nproc_per_node or trial_processes(config, len(self.gpus))
            if processes > len(self.gpus):
                sys.exit(f"tunelab: error: each trial runs {processes} ranks, one per GPU, and this node has only "
                         f"GPUs {','.join(self.gpus)} (CUDA_VISIBLE_DEVICES): lower trainer.devices (or "
                         f"hydra.launcher.nproc_per_node) to {len(self.gpus)} or fewer")
        else:
            n_jobs = OmegaConf.select(config, "hydra.sweeper.n_jobs", default=None)  # the sweeper checks it
            self.cpu_trials = self.max_parallel or (n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1)
            self.slots = Slots([str(slot) for slot in range(self.cpu_trials)])
        # On GPUs the GPUs pace the trials; max_parallel may hold them to fewer.
        self.parallel = threading.BoundedSemaphore(self.max_parallel) if self.gpus and self.max_parallel else nullcontext()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with self.preparing:
            setup_globals()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            trials = [self._trial(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        if len(trials) == 1:
            self._run(trials[0])
        else:
            with ThreadPoolExecutor(len(trials), thread_name_prefix="torchrun-trial") as pool:
                list(pool.map(self._run, trials))
        return [self._result(trial) for trial in trials]

    def _trial(self, num: int, overrides: list[str]) -> Trial:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = str(num)
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra.job.num} in the trial's subdir
        directory = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
        processes = self.nproc_per_node or trial_processes(cfg, len(self.gpus))
        return Trial(num, overrides, cfg, directory, processes, gpus=[])

    def _run(self, trial: Trial) -> None:
        """Starts the trial once its GPUs (or its CPU slot) are free, waits for it to end, gives them back."""
        if self.gpus and trial.processes > len(self.gpus):
            trial.refused = f"needs {trial.processes} GPUs, this node has {len(self.gpus)}"
            return
        with self.parallel:
            taken = self.slots.take(trial.processes if self.gpus else 1)
            try:
                trial.gpus = taken if self.gpus else []
                self._start(trial)
                trial.process.wait()
                log.info(f"\t#{trial.num} exited {trial.process.returncode} ({trial.directory})")
            finally:
                self.slots.give_back(taken)

    def threads_per_rank(self, trial: Trial) -> int:
        """The rank's share of this node's cores: on GPUs one GPU's share, on CPU one slot's share split over the
        trial's ranks."""
        share = len(self.gpus) if self.gpus else self.cpu_trials * trial.processes
        return max(1, cpu_cores() // share)

    def _start(self, trial: Trial) -> None:
        script = self.script or os.path.abspath(sys.argv[0])
        # One rank needs no torchrun, whose agent would add its own start-up and exit (5 s a trial on 2 busy cores).
        runner = [] if trial.processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={trial.processes}"]
        command = [sys.executable, *runner, script, *trial.overrides, *forwarded_hydra_overrides(self.config),
                   f"hydra.run.dir={trial.directory}", f"hydra.job.num={trial.num}", f"hydra.job.id={trial.num}"]
        # An OMP_NUM_THREADS of the user's own wins (torch reads it for its intra-op threads).
        env = {"OMP_NUM_THREADS": str(self.threads_per_rank(trial)), **os.environ,
               "TUNELAB_SWEEP_DIR": str(Path(str(trial.cfg.hydra.sweep.dir)).absolute()),
               "TUNELAB_TRIAL_NUMBER": str(trial.num)}
        if trial.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(trial.gpus)
        trial.directory.mkdir(parents=True, exist_ok=True)
        where = f"GPUs {','.join(trial.gpus)}" if trial.gpus else "CPU"
        log.info(f"\t#{trial.num} : {' '.join(filter_overrides(trial.overrides))}  "
                 f"[{trial.processes} ranks, {where}, {env['OMP_NUM_THREADS']} threads each]")
        with open(trial.directory / LOG_FILE, "wb") as output:
            trial.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    def _result(self, trial: Trial) -> JobReturn:
        result = JobReturn(overrides=trial.overrides, cfg=trial.cfg, hydra_cfg=trial.cfg, working_dir=str(trial.directory),
                           task_name=trial.cfg.hydra.job.name)
        if trial.refused:
            result._return_value, result.status = ValueError(f"trial #{trial.num} {trial.refused}"), JobStatus.FAILED
            return result
        try:
            if trial.process.returncode != 0:
                raise RuntimeError(f"exit code {trial.process.returncode}")
            result._return_value, result.status = read_objective(trial.directory), JobStatus.COMPLETED
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            cause = first_error_line((trial.directory / LOG_FILE).read_text(errors="replace"))
            result._return_value = RuntimeError(f"trial #{trial.num} failed ({error}): {cause}  [log: {trial.directory / LOG_FILE}]")
            result.status = JobStatus.FAILED
        return result
