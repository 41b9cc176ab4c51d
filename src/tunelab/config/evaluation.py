"""The eval group: eval=auto resolved to a plain option (tunelab.evaluation), and an eval/<task>/<metric> objective
held to it."""

import importlib.util
import logging
import os

from omegaconf import DictConfig, ListConfig, open_dict

from tunelab.config.fields import EVAL_AUTO, EVAL_FIELDS, check_fields
from tunelab.errors import ConfigError, show
from tunelab.strategy import launch_rank

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"  # what tunelab.evaluation logs: eval/<task>/<metric>


def resolve_auto_evaluation(cfg: DictConfig) -> tuple[str | None, str | None]:
    """eval=auto (the default) becomes eval=tiny's options where the run trains on the embedded task and lm_eval is
    installed, else none (eval=none's {}), so the checks after this one and the run see a plain option. Returns why
    auto left evaluation off, and the line that tells the run so (none where eval.auto=off asked for it)."""
    options = cfg.get("eval")
    if not options or "auto" not in options:
        return None, None
    when = options.auto
    if (problem := EVAL_AUTO.problem(when)) is not None:
        raise ConfigError(f"eval.auto={show(when)} {problem} (TUNELAB_EVAL_AUTO sets it)")
    why = line = None
    if when == "off":
        why = "TUNELAB_EVAL_AUTO=off" if os.environ.get("TUNELAB_EVAL_AUTO") == "off" else "eval.auto=off"
    elif (source := cfg.data.get("source")) != "tiny":
        why = f"eval=auto evaluates the embedded task only, not data.source={source}"
        line = (f"benchmark evaluation off: eval=auto evaluates the embedded task (data=tiny) only, not data.source="
                f"{source}; eval=hub eval.tasks=[arc_easy] for lm-eval's own tasks")
    elif importlib.util.find_spec("lm_eval") is None:
        why = "eval=auto: lm_eval is not installed"
        line = "benchmark evaluation off: lm_eval is not installed (pip install 'tunelab[eval]' to evaluate the embedded task)"
    with open_dict(cfg):
        if why is None:
            del cfg.eval["auto"]
        else:
            cfg.eval = {}
    return why, line


def check_evaluation(cfg: DictConfig) -> None:
    """The `eval` option (tunelab.evaluation), and an eval/<task>/<metric> objective against it. Whether a task exists
    and its data can be had is asked of the harness itself, before training (tunelab.evaluation.harness.check_tasks)."""
    off, line = resolve_auto_evaluation(cfg)
    options, metric = cfg.get("eval"), cfg.objective.metric
    if not options:
        if metric.startswith(EVAL_PREFIX):
            raise ConfigError(f"objective.metric={metric} is a benchmark score, and benchmark evaluation is off "
                              f"({off or 'eval=none'}): pick an eval option whose eval.tasks lists its task "
                              "(e.g. eval=tiny), or another objective.metric")
        if line and launch_rank() == 0:  # each rank of a DDP job validates the config: one of them says it
            log.info(line)
        return
    tasks = options.get("tasks")
    if not isinstance(tasks, ListConfig) or not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ConfigError(f"eval.tasks={show(tasks)} must be a non-empty list of lm-eval task names, e.g. "
                          "eval.tasks=[tunelab_tiny,arc_easy]")
    check_fields(cfg, EVAL_FIELDS, absent=None)
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval needs the lm_eval package: pip install 'tunelab[eval]' (or eval=none)")
    if not metric.startswith(EVAL_PREFIX):
        return
    task = metric.removeprefix(EVAL_PREFIX).split("/")[0]
    if task not in tasks:
        raise ConfigError(f"objective.metric={metric}: task {task} is not in eval.tasks={show(tasks)}; add it there")
    if options.every_n_validations != 1:
        raise ConfigError(f"objective.metric={metric} is read at every validation (checkpoint, early stopping, a sweep's "
                          "pruner): set eval.every_n_validations=1")
