"""validate_config: every check of the composed config, in the order each can trust what the ones before it held."""

import logging

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.config.data import check_data
from tunelab.config.evaluation import check_evaluation
from tunelab.config.fields import check_fields
from tunelab.config.grpo import check_grpo
from tunelab.config.model import check_model, check_peft
from tunelab.config.placement import check_float8, check_fsdp_adapters, check_kernels, check_placement
from tunelab.config.tracking import check_tracking_server
from tunelab.config.training import check_objective, check_optim, check_preference, check_run, check_trainer
from tunelab.errors import ConfigError
from tunelab.precision import precision_warnings
from tunelab.targets import check_group_targets

log = logging.getLogger(__name__)


def validate_config(cfg: DictConfig) -> None:
    for check in (check_resolves, check_fields, check_model, check_data, check_peft, check_kernels, check_optim,
                  check_trainer, check_fsdp_adapters, check_placement, check_float8, check_run, check_preference, check_grpo,
                  check_objective, check_evaluation, check_tracking_server,
                  check_group_targets):  # last: it imports the classes the config names, Lightning with them
        check(cfg)
    for warning in precision_warnings(cfg.precision, cfg.model):
        log.warning(warning)


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves (an unset environment variable, a key that is not there), so no later read of a
    value raises."""
    try:
        for key in cfg:
            if key == "hydra":
                continue
            value = cfg[key]  # a scalar resolves as it is read
            if isinstance(value, DictConfig):
                OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{error.full_key} does not resolve: {str(error.msg).splitlines()[0]}") from error
