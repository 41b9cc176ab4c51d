"""ConfigError: the one line a run stops with before anything heavy loads, and how a value or an upstream error is
written into it. Imports nothing of tunelab, so any module may raise it without reaching up the house."""

import json
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    pass


def one_line(error: BaseException, limit: int | None = 300, named: bool = False) -> str:
    """An upstream error's message for the end of a ConfigError line: on one line, cut after `limit` characters, led by
    the exception's type where `named` (an import failure's type says as much as its message)."""
    text = " ".join(str(error).split())
    if named:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = text or type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def show(value: Any) -> str:
    """A config value as a user would type it on the command line, on one line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return value if value.isprintable() else json.dumps(value)
    return json.dumps(value)
