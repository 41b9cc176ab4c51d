"""Checks the whole composed config once, up front, before anything heavy is imported or loaded (validate_config).

Every problem is reported as one ConfigError line that says what is wrong and how to fix it. First each key is held
to the type and range of the field table, so the checks after it, which relate keys to each other and to the
hardware, can trust what they read.

fields.py      the field table: what each key of each group may hold
validate.py    validate_config: every check, in order
model.py       model and peft: weights, tokenizer, chat template, adapter
data.py        data: where rows come from, data.sources, templates, packing
placement.py   strategy, devices, precision and kernels against the hardware here
training.py    optim, trainer, ckpt_path, the objective, module=dpo's pairs
grpo.py        module=grpo: its keys, reward functions and what it samples from
evaluation.py  eval=auto resolved to a plain option, eval's keys, an eval/ objective
tracking.py    the MLflow tracking server answers
"""

from tunelab.config.validate import validate_config
from tunelab.errors import ConfigError

__all__ = ["ConfigError", "validate_config"]
