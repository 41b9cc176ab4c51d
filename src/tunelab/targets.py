"""Own code by `_target_`: the groups a user may extend with their own class (a callback, the data module, the
logger, the LightningModule) import the target and build it only when it is a class of the kind the group builds.

Hydra's name whitelist refused every user class; a type check welcomes any Callback, LightningDataModule, Logger or
LightningModule and still refuses `os.system`, `builtins.eval`, a function or a class of another kind (say
`subprocess.Popen`), each with one ConfigError line. tunelab.config runs check_group_targets over the whole config
up front, and every builder checks again what it builds. Only a group's own `_target_` is built: one nested in its
arguments is refused, so no argument can smuggle in a call the check never saw.
"""

import importlib
import inspect
from types import ModuleType
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError, one_line, show


class Group(NamedTuple):
    base: str                      # every target of the group subclasses this class
    given: tuple[str, ...] = ()    # arguments tunelab passes besides the config's keys
    offered: tuple[str, ...] = ()  # arguments tunelab passes only to a constructor that names them or takes **kwargs


GROUPS = {
    "callbacks": Group("lightning.pytorch.Callback"),
    "data": Group("lightning.pytorch.LightningDataModule", given=("tokenizer",)),
    "logger": Group("lightning.pytorch.loggers.Logger"),
    "module": Group("lightning.pytorch.LightningModule", given=("model", "optim"),
                    offered=("loss", "adapter_only_checkpoints")),
}


def check_group_targets(cfg: DictConfig) -> None:
    """Every target of the extensible groups, imported and checked. It imports the classes (Lightning with them), so
    tunelab.config runs it after the checks that read the config alone."""
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is not None:
            check_target(f"callbacks.{name}", spec)
    for group in ("data", "logger", "module"):
        if cfg.get(group):
            check_target(group, cfg[group])


def build_target(key: str, spec: DictConfig | dict, **arguments: Any) -> Any:
    """`spec._target_` called with the spec's other keys and `arguments` (its group's given and offered ones), once
    it has passed check_target."""
    spec = plain(spec)
    cls = check_target(key, spec)
    group = GROUPS[key.split(".")[0]]
    taken = {name: value for name, value in arguments.items() if name not in group.offered or takes(cls, name)}
    return cls(**{name: value for name, value in spec.items() if name != "_target_"}, **taken)


def check_target(key: str, spec: DictConfig | dict) -> type:
    """The class `spec._target_` names, once it imports, subclasses its group's base and takes the spec's keys."""
    spec = plain(spec)
    group = GROUPS[key.split(".")[0]]
    path = spec.get("_target_")
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key}._target_={show(path)} must name a class by its import path, e.g. mypackage.MyClass "
                          f"(a subclass of {group.base})")
    target = import_target(f"{key}._target_", path)
    module, _, name = group.base.rpartition(".")
    base = getattr(importlib.import_module(module), name)
    if not isinstance(target, type):
        raise ConfigError(f"{key}._target_={path} is {describe(target)}, not a class: {key} takes a subclass of "
                          f"{group.base}")
    if not issubclass(target, base):
        raise ConfigError(f"{key}._target_={path} is not a subclass of {group.base}, which {key} takes")
    for name, value in spec.items():
        if name != "_target_" and name.startswith("_") and name.endswith("_"):
            raise ConfigError(f"{key}.{name}: tunelab calls {path} with the keys of {key} as its arguments and takes "
                              "no Hydra instantiate flag there; remove it")
        if name in getattr(target, "function_targets", ()):
            continue  # a list of functions by `_target_` that the class imports itself (module=grpo's rewards)
        if nested := find_nested_target(value, f"{key}.{name}"):
            raise ConfigError(f"{nested[0]}._target_={show(nested[1])}: tunelab builds only the {key}._target_ class, "
                              "never a _target_ in its arguments; build that object in your class's __init__")
    check_arguments(key, path, target, [name for name in spec if name != "_target_"], group)
    return target


def import_target(key: str, path: str) -> Any:
    """The object at a dotted path: the longest prefix that is a module, then attributes."""
    parts = path.split(".")
    missing = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                missing = missing or error  # this prefix is not a module: try the shorter one
                continue
            raise import_failed(key, path, module_name, error) from error
        except Exception as error:  # the user's module raised while it was imported
            raise import_failed(key, path, module_name, error) from error
        for depth, attribute in enumerate(parts[cut:]):
            if not hasattr(found, attribute):
                if missing is not None and depth == 0:
                    break  # a module that does not exist, rather than a name missing from one that does
                owner = ".".join(parts[:cut + depth])
                raise ConfigError(f"{key}={path}: {owner} has no {attribute}; fix the path to the class")
            found = getattr(found, attribute)
        else:
            return found
        break
    name = missing.name if missing is not None else parts[0]
    raise ConfigError(f"{key}={path}: there is no module {name}: fix the module path, or put the directory that "
                      "holds it on PYTHONPATH")


def check_arguments(key: str, path: str, target: type, names: list[str], group: Group) -> None:
    """The spec's keys, with what tunelab passes, bind to the constructor: a misspelt key is one line, not a
    TypeError from deep inside the build."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a constructor Python cannot introspect (written in C): its call will tell
        return
    offered = [name for name in group.offered if takes(target, name)]
    try:
        signature.bind(**dict.fromkeys([*names, *group.given, *offered]))
    except TypeError as error:
        given = f" (tunelab also passes {', '.join(group.given)})" if group.given else ""
        raise ConfigError(f"{key}._target_={path}: {error}; it takes {signature}{given}") from error


def takes(target: type, name: str) -> bool:
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def find_nested_target(node: Any, key: str) -> tuple[str, Any] | None:
    if isinstance(node, dict):
        if "_target_" in node:
            return key, node["_target_"]
        children = node.items()
    elif isinstance(node, list):
        children = ((str(index), value) for index, value in enumerate(node))
    else:
        return None
    for name, value in children:
        if found := find_nested_target(value, f"{key}.{name}"):
            return found
    return None


def describe(value: Any) -> str:
    if isinstance(value, ModuleType):
        return "a module"
    if inspect.isroutine(value):
        return "a function"
    return f"a {type(value).__name__} object"


def plain(spec: DictConfig | dict) -> dict:
    return OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec


def import_failed(key: str, path: str, module_name: str, error: BaseException) -> ConfigError:
    return ConfigError(f"{key}={path}: importing {module_name} failed: {one_line(error, limit=None, named=True)}")
