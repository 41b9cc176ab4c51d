"""Where a run resumes from (`ckpt_path`), how checkpoints reach the disk whole, and how FSDP shards gather into one
model (for the export, tunelab.export)."""

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

from tunelab.errors import ConfigError
from tunelab.preemption import was_preempted

STAGING, REPLACED = ".tmp-", ".old-"  # suffixes of a checkpoint being written, and of the one it replaces


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last`: this run dir's last.ckpt if it has one (a re-run sweep trial), else the newest under outputs/.
    None (the default) also resumes this run dir's last.ckpt where the run in it was preempted: a re-run continues it."""
    if cfg.ckpt_path not in ("last", None):
        return cfg.ckpt_path
    own = last_checkpoint(Path(cfg.paths.output_dir) / "checkpoints")
    if cfg.ckpt_path is None:
        return str(own) if own and was_preempted(cfg.paths.output_dir) else None
    if own:
        return str(own)
    candidates = sorted(Path(cfg.paths.root, "outputs").glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no checkpoints/last.ckpt under {Path(cfg.paths.root, 'outputs')}; give a path")
    return str(candidates[-1])


def last_checkpoint(directory: Path) -> Path | None:
    """`directory`/last.ckpt (a file, or the directory of a sharded FSDP checkpoint), never a half-written one (those
    have other names until whole); where a kill fell between the two renames of a directory swap, the previous one."""
    last = directory / "last.ckpt"
    if last.exists():
        return last
    replaced = sorted(directory.glob(f"last.ckpt{REPLACED}*"), key=lambda p: p.stat().st_mtime)
    return replaced[-1] if replaced else None


def staging_path(target: Path) -> Path:
    return target.with_name(f"{target.name}{STAGING}{os.getpid()}")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(target: Path) -> None:
    """What killed writes of `target` left behind: staging files or directories, and replaced directories."""
    for sibling in target.parent.iterdir():
        if sibling.name.startswith((f"{target.name}{STAGING}", f"{target.name}{REPLACED}")):
            remove_path(sibling)


def fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries (the names renamed into it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the whole directory `staging` in place of `target`. A directory cannot be renamed over a non-empty one, so
    the old one moves aside first; a kill between the two renames leaves `target` missing and the old one whole under
    its `.old-` name, which last_checkpoint falls back on."""
    for file in staging.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(staging)
    if target.exists():
        replaced = target.with_name(f"{target.name}{REPLACED}{os.getpid()}")
        os.replace(target, replaced)
        os.replace(staging, target)
        fsync(target.parent)
        remove_path(replaced)
    else:
        os.replace(staging, target)
        fsync(target.parent)


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with `save_last` writing last.ckpt at every validation. Lightning 2.6 writes it only
    in a step that also saved a top-k checkpoint, so once the objective stopped improving last.ckpt stayed at the best
    step and `ckpt_path=last` resumed from there, repeating every step after it."""

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        # _should_skip_saving_checkpoint is also true where this step was saved already (top-k and last together).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) \
                and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file to a staging file next to it (`last.ckpt.tmp-<pid>`), fsyncs it and renames it into
    place: a checkpoint file is whole or not there, whatever kills the process.

    Lightning's TorchCheckpointIO stages in $TMPDIR and moves the file in, which is a rename only where $TMPDIR and
    the checkpoint share a filesystem. On a cluster (node-local $TMPDIR, shared outputs) the move is a copy into
    place, and a kill during it left a truncated last.ckpt that `ckpt_path=last` picked up and failed on. It also
    held a second copy of the whole checkpoint in memory."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        staging = staging_path(target)
        with open(staging, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        if target.is_dir():  # a sharded checkpoint of the same name, now replaced by a whole one
            replace_directory(staging, target)
        else:
            os.replace(staging, target)
            fsync(target.parent)


def writes_checkpoint_directories(strategy: Strategy) -> bool:
    """Strategies that write a checkpoint as a directory, with their own code rather than the CheckpointIO."""
    if isinstance(strategy, FSDPStrategy):
        return strategy._state_dict_type == "sharded"
    if isinstance(strategy, ModelParallelStrategy):  # FSDP2 (tunelab.fsdp2): torch.distributed.checkpoint's shards
        return strategy._save_distributed_checkpoint
    return isinstance(strategy, DeepSpeedStrategy)


def stage_directory_checkpoints(strategy: Strategy) -> None:
    """Sharded FSDP (1 and 2) and DeepSpeed write each checkpoint into its directory in place, over the previous one (every rank
    its shard, then rank 0 the metadata): a kill mid-write left a mix of two checkpoints under the name `ckpt_path=last`
    resumes. Their saves now write a staging directory, which rank 0 swaps in once every rank is done."""
    if not writes_checkpoint_directories(strategy):
        return
    save = strategy.save_checkpoint

    def save_staged(checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        target = Path(strategy.broadcast(str(filepath)))
        staging = Path(strategy.broadcast(str(staging_path(target))))  # rank 0's pid names it on every rank
        if strategy.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(target)
        strategy.barrier("tunelab_staging_clear")
        save(checkpoint, staging, storage_options)
        strategy.barrier("tunelab_staging_written")
        if strategy.is_global_zero:
            replace_directory(staging, target)
        strategy.barrier("tunelab_staging_replaced")

    strategy.save_checkpoint = save_staged


def gather_fsdp_weights(wrapped: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, gathered from every FSDP shard into rank 0's CPU memory (other ranks get an empty
    dict), keyed as the transformers/PEFT model's own state_dict. `wrapped`: the strategy's model, FSDP around the
    LightningModule whose `model` is the transformers/PEFT one. Every rank must call it: each sends its shard.
    None where the model is not sharded, so rank 0 already holds all of it. FSDP2 shards the LightningModule's model
    in place (tunelab.fsdp2), with the model's own parameter names."""
    from tunelab.fsdp2 import gather_full_state, is_sharded

    model = getattr(wrapped, "model", None)
    if isinstance(model, torch.nn.Module) and is_sharded(model):
        return gather_full_state(model)
    if not isinstance(wrapped, FullyShardedDataParallel):
        return None
    # Offloading a CPU-resident model frees the storage it copies from (gloo runs crash with "setStorage").
    gathered = FullStateDictConfig(offload_to_cpu=wrapped.compute_device.type != "cpu", rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, gathered):
        state = wrapped.state_dict()
    return {key.removeprefix("model."): value for key, value in state.items()}  # the LightningModule's `model`

