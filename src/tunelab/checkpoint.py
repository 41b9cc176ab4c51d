"""Where a run resumes from (`ckpt_path`) and what it exports when done."""

from pathlib import Path

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import ConfigError


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last`: this run dir's last.ckpt if it has one (a re-run sweep trial), else the newest under outputs/."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.exists():  # a file, or the directory of a sharded FSDP checkpoint
        return str(own)
    candidates = sorted(Path(cfg.paths.root, "outputs").glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no checkpoints/last.ckpt under {Path(cfg.paths.root, 'outputs')}; give a path")
    return str(candidates[-1])


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """save_pretrained of the fine-tuned model, or only of its LoRA adapter, next to its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
