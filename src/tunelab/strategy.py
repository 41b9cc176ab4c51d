"""Builds the `strategy` group: a Lightning strategy plus the devices it runs on."""

from hydra.utils import instantiate
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig, OmegaConf

# Keys of a strategy option that describe where it runs rather than arguments of the strategy class.
PLACEMENT_KEYS = ("name", "devices", "accelerator")


def strategy_devices(cfg: DictConfig, trainer_cfg: DictConfig):
    """The devices value the Trainer gets: the strategy's own (fsdp8 means 8) or trainer.devices."""
    return cfg.get("devices") or trainer_cfg.devices


def strategy_accelerator(cfg: DictConfig, trainer_cfg: DictConfig) -> str:
    return cfg.get("accelerator") or trainer_cfg.accelerator


def build_strategy(cfg: DictConfig) -> Strategy | str:
    if "_target_" not in cfg:
        return cfg.name
    arguments = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in PLACEMENT_KEYS}
    return instantiate(arguments, _convert_="all")
