"""A Hydra launcher that runs every sweep trial as its own single-run distributed job under torchrun.

Lightning starts the ranks of a multi-device run by re-executing `sys.argv` (Lightning #11300), so under `-m` each
extra rank would start a sweep of its own. Here the sweep stays in this process, and each trial becomes
`torchrun --standalone --nproc-per-node N train.py <trial overrides> hydra.run.dir=<trial dir>`: a plain run in which
torchrun has already started every rank, so Lightning starts none. The trial's objective is read back from the
`objective.json` its rank 0 writes. With GPUs, trials run side by side on disjoint GPU sets (CUDA_VISIBLE_DEVICES);
on CPU, ranks talk over gloo and `max_parallel` trials run at once.
"""

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

OBJECTIVE_FILE = "objective.json"
LOG_FILE = "torchrun.log"


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.tunelab_launcher.torchrun_launcher.TorchrunLauncher"
    # Processes per trial; null: the trial's own device count (strategy devices or trainer.devices).
    nproc_per_node: Any = None
    # Trials at once; null: as many as the GPUs hold side by side, and one at a time on CPU.
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


@dataclass
class Trial:
    num: int
    overrides: list[str]
    cfg: DictConfig
    directory: Path
    processes: int
    gpus: list[str]
    process: subprocess.Popen | None = None


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int | None = None, max_parallel: int | None = None, script: str | None = None):
        self.nproc_per_node = nproc_per_node
        self.max_parallel = max_parallel
        self.script = script
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus()
        trials = [self._trial(initial_job_idx + i, list(o), len(gpus)) for i, o in enumerate(job_overrides)]
        for trial in trials:
            if gpus and trial.processes > len(gpus):
                raise ValueError(f"trial #{trial.num} needs {trial.processes} GPUs, found {len(gpus)}")
        self._run_all(trials, gpus)
        return [self._result(trial) for trial in trials]

    def _trial(self, num: int, overrides: list[str], gpus: int) -> Trial:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = str(num)
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra.job.num} in the trial's subdir
        directory = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
        processes = self.nproc_per_node or trial_processes(cfg, gpus)
        return Trial(num, overrides, cfg, directory, processes, gpus=[])

    def _run_all(self, trials: list[Trial], gpus: list[str]) -> None:
        parallel = self.max_parallel or (max(1, len(gpus) // max(t.processes for t in trials)) if gpus else 1)
        waiting, running, free = list(trials), [], list(gpus)
        while waiting or running:
            while waiting and len(running) < parallel and (not gpus or len(free) >= waiting[0].processes):
                trial = waiting.pop(0)
                trial.gpus, free = free[: trial.processes if gpus else 0], free[trial.processes if gpus else 0 :]
                self._start(trial)
                running.append(trial)
            time.sleep(0.2)
            for trial in [t for t in running if t.process.poll() is not None]:
                running.remove(trial)
                free += trial.gpus
                log.info(f"\t#{trial.num} exited {trial.process.returncode} ({trial.directory})")

    def _start(self, trial: Trial) -> None:
        script = self.script or os.path.abspath(sys.argv[0])
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={trial.processes}",
            script, *trial.overrides, *forwarded_hydra_overrides(self.config),
            f"hydra.run.dir={trial.directory}", f"hydra.job.num={trial.num}", f"hydra.job.id={trial.num}",
        ]
        env = {**os.environ, "TUNELAB_SWEEP_DIR": str(Path(str(trial.cfg.hydra.sweep.dir)).absolute()),
               "TUNELAB_TRIAL_NUMBER": str(trial.num)}
        if trial.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(trial.gpus)
        trial.directory.mkdir(parents=True, exist_ok=True)
        where = f"GPUs {','.join(trial.gpus)}" if trial.gpus else "CPU"
        log.info(f"\t#{trial.num} : {' '.join(filter_overrides(trial.overrides))}  [{trial.processes} ranks, {where}]")
        with open(trial.directory / LOG_FILE, "wb") as output:
            trial.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    def _result(self, trial: Trial) -> JobReturn:
        result = JobReturn(overrides=trial.overrides, cfg=trial.cfg, hydra_cfg=trial.cfg, working_dir=str(trial.directory),
                           task_name=trial.cfg.hydra.job.name)
        try:
            if trial.process.returncode != 0:
                raise RuntimeError(f"exit code {trial.process.returncode}")
            result._return_value, result.status = read_objective(trial.directory), JobStatus.COMPLETED
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            cause = first_error_line((trial.directory / LOG_FILE).read_text(errors="replace"))
            result._return_value = RuntimeError(f"trial #{trial.num} failed ({error}): {cause}  [log: {trial.directory / LOG_FILE}]")
            result.status = JobStatus.FAILED
        return result
