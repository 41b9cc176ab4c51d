"""The data option → its LightningDataModule: the streaming one where data.streaming is true, else `data._target_`
(tunelab's or the user's own, tunelab.targets)."""

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from tunelab.data.stream_datamodule import StreamingDataModule
from tunelab.targets import build_target


def build_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> pl.LightningDataModule:
    """`data._target_` (tunelab's or the user's own LightningDataModule, tunelab.targets) with the option's keys and
    the tokenizer."""
    if cfg.get("streaming"):
        options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("_target_", "streaming")}
        return StreamingDataModule(tokenizer=tokenizer, **options)
    return build_target("data", cfg, tokenizer=tokenizer)
