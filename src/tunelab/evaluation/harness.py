"""lm-evaluation-harness on a model in memory: `evaluate` hands the model instance and its tokenizer to the harness's
HFLM, so nothing is written to disk for it, and answers the harness's results dict.

Under DDP every rank holds the whole model: each evaluates its share of the documents (the harness's own split by
rank) and rank 0 gathers the per-document scores through torch.distributed, as `accelerate launch` would. Under FSDP
and DeepSpeed ZeRO-3 each forward needs every rank, so each rank runs the whole evaluation in step (the same requests,
generation with synced_gpus) and all get the same results. lm_eval is imported only here, only when an evaluation
runs: `train.py --help` and a config error never load it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, one_line
from tunelab.evaluation.local_tasks import local_task_configs, task_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Distribution:
    """How the ranks of a run share an evaluation: `split` (each its documents, DDP) or `lockstep` (each all of them
    together, sharded models), over `world_size` ranks, this one `rank`."""

    def __init__(self, world_size: int = 1, rank: int = 0, sharded: bool = False):
        self.world_size, self.rank = world_size, rank
        self.mode = "single" if world_size == 1 else ("lockstep" if sharded else "split")


def task_manager(tasks: list[str], cache_dir: str | Path):
    """The harness's task index: tunelab's own tasks, plus lm_eval's (about 15k YAML files, seconds to index) only
    where a task is not one of tunelab's."""
    from lm_eval.tasks import TaskManager

    local = set(local_task_configs())
    return TaskManager(include_path=str(task_dir(cache_dir)), include_defaults=not set(tasks) <= local)


def check_tasks(tasks: list[str], cache_dir: str | Path):
    """Each task is known and its data is here or can be fetched; answers the task manager. A task that is not there
    ends in one ConfigError line, before training starts."""
    quiet_harness()
    manager = task_manager(tasks, cache_dir)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"eval.tasks: no lm-eval task named {', '.join(unknown)} (tunelab's own: "
                          f"{', '.join(sorted(local_task_configs()))}; lm_eval's: `lm_eval ls tasks`)")
    try:
        manager.load(list(tasks))  # fetches each task's dataset into the datasets cache, or fails here
    except Exception as error:  # the harness and datasets raise many kinds: a missing hub dataset, no network
        raise ConfigError(f"eval.tasks={','.join(tasks)}: the task data cannot be loaded ({one_line(error, 240, named=True)}); "
                          "hub tasks need the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset) or their data "
                          "in the datasets cache") from error
    return manager


def quiet_harness() -> None:
    """The harness warns, at each evaluation, that it got a model instance, which is how tunelab uses it."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def training_lm(model, tokenizer, batch_size: int, distribution: Distribution):
    """An HFLM over the model instance, told its rank and how to reach the others."""
    import torch
    import torch.distributed as dist
    from lm_eval.models.huggingface import HFLM

    class TrainingLM(HFLM):
        def __init__(self):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            if distribution.mode == "split":
                self._rank, self._world_size = distribution.rank, distribution.world_size

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst: int = 0):
            parts = [None] * self.world_size if self.rank == dst else None
            dist.gather_object(obj, parts, dst=dst)
            return parts

        def barrier(self) -> None:
            dist.barrier()

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if distribution.mode == "lockstep":  # each rank keeps stepping until all are done
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return TrainingLM()


@contextmanager
def training_state_kept(model: torch.nn.Module):
    """The harness seeds Python's, NumPy's and torch's RNGs and puts the model in eval mode: a run evaluated mid-way
    trains on as if it had not been."""
    from tunelab.modules.base import restore_rng_states, rng_states

    states = rng_states()
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
        restore_rng_states(states)


@contextmanager
def masked_attention(model: torch.nn.Module):
    """transformers' sdpa attention while the harness runs. tunelab trains with an attention that reads no padding mask
    (tunelab.packing: exact on the real tokens of right-padded rows), and the harness left-pads the prompts it
    generates from: under the training attention a shorter prompt would attend to its padding."""
    from tunelab.packing import TRAINING_ATTENTION

    own = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(own.config, "_attn_implementation", None) != TRAINING_ATTENTION:
        yield
        return
    own.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        own.set_attn_implementation(TRAINING_ATTENTION)


def evaluate(model, tokenizer, manager, tasks: list[str], limit: int | None, batch_size: int,
             num_fewshot: int | None = None, distribution: Distribution | None = None) -> dict | None:
    """The harness's results dict for `model` on `tasks` (at most `limit` documents each); None on ranks other than
    0 where the ranks split the documents."""
    import torch
    from lm_eval import simple_evaluate

    distribution = distribution or Distribution()
    quiet_harness()
    with training_state_kept(model), masked_attention(model), torch.no_grad():
        lm = training_lm(model, tokenizer, batch_size, distribution)
        results = simple_evaluate(lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                  log_samples=False)
    if results is not None:
        results.pop("samples", None)
    return results
