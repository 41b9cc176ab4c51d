"""Every option of every config group composes, validates where this machine can run it, and builds its object
without downloading anything; a hub model option loads from a local directory made by save_pretrained."""

import importlib.util

import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from tests.conftest import CONF, FAST, compose_config, run_train
from tunelab.callbacks import build_callbacks
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import ConfigError, validate_config
from tunelab.data import InstructionDataModule, RandomTokenDataModule, build_datamodule
from tunelab.logger import build_logger
from tunelab.model import build_model, count_parameters
from tunelab.module import CausalLMModule, build_module
from tunelab.peft import apply_peft
from tunelab.strategy import build_strategy

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, option.stem) for group in GROUPS for option in sorted((CONF / group).glob("*.yaml"))]
# Parameter counts of the published checkpoints, which the architecture blocks must reproduce.
HUB_PARAMETERS = {"llama1b": 1_235_814_400, "llama8b": 8_030_261_248, "qwen2_5_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512}
NEEDS_GPU = {("strategy", "fsdp"), ("strategy", "fsdp8"), ("strategy", "deepspeed_zero3"), ("precision", "16_mixed")}
# Options whose package is an optional extra: validation names the install command instead of building them.
NEEDS_EXTRA = {("strategy", "deepspeed_zero3"): "deepspeed"}
# Options that quantize a pretrained base as it loads: over the embedded random-init default they are refused
# (tests/test_qlora.py builds them over a saved model).
NEEDS_PRETRAINED = {("peft", "qlora")}


def test_every_group_has_options():
    assert {"model", "data", "peft", "optim", "strategy", "precision", "module", "callbacks", "logger", "trainer", "sweep",
            "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 26


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_builds(group, option, tmp_path, dataset_cache, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    extra = [f"data.path={tmp_path / 'rows.jsonl'}"] if (group, option) == ("data", "jsonl") else []
    (tmp_path / "rows.jsonl").write_text('{"instruction": "echo", "input": "a", "output": "a"}\n')
    cfg = compose_config([f"{group}={option}", *extra], tmp_path, dataset_cache)
    if (group, option) in NEEDS_EXTRA and importlib.util.find_spec(NEEDS_EXTRA[group, option]) is None:
        with pytest.raises(ConfigError, match="GPU|pip install 'tunelab"):
            validate_config(cfg)
        return
    if (group, option) in NEEDS_PRETRAINED:
        with pytest.raises(ConfigError, match="needs model.init=pretrained"):
            validate_config(cfg)
        return
    if (group, option) in NEEDS_GPU:
        with pytest.raises(ConfigError, match="GPU"):
            validate_config(cfg)
    elif group != "model":  # hub models validate the same way but would load their tokenizer from the hub
        validate_config(cfg)

    tokenizer = build_char_tokenizer()
    if group == "model":
        if option in HUB_PARAMETERS:
            cfg.model.init = "random"
            with torch.device("meta"):
                model = build_model(cfg.model, cfg.precision, tokenizer)
            assert count_parameters(model)[1] == HUB_PARAMETERS[option]
        else:
            assert count_parameters(build_model(cfg.model, cfg.precision, tokenizer))[1] > 1_000_000
    elif group == "data":
        expected = RandomTokenDataModule if option == "random_tokens" else InstructionDataModule
        assert isinstance(build_datamodule(cfg.data, tokenizer), expected)
    elif group == "peft":
        model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
        trainable, total = count_parameters(model)
        assert (trainable < total / 10) if option == "lora" else (trainable == total)
    elif group == "strategy":
        strategy = build_strategy(cfg.strategy, build_model(cfg.model, cfg.precision, tokenizer))
        expected = {"auto": str, "ddp": DDPStrategy, "fsdp": FSDPStrategy, "fsdp8": FSDPStrategy}.get(option, object)
        assert isinstance(strategy, expected)
    elif group == "module":
        module = build_module(cfg.module, build_model(cfg.model, cfg.precision, tokenizer), cfg.optim)
        assert isinstance(module, CausalLMModule)
    elif group == "callbacks":
        callbacks = [type(callback).__name__ for callback in build_callbacks(cfg.callbacks)]
        assert len(callbacks) == 9 if option == "default" else callbacks == ["DivergenceGuard"]  # none keeps the guard
    elif group == "logger":
        logger = build_logger(cfg)
        assert (logger is None) == (option == "none")
        assert not isinstance(logger, MLFlowLogger) or logger._tracking_uri.startswith("sqlite:")


def test_a_callback_switches_off_by_override(tmp_path, dataset_cache):
    cfg = compose_config(["callbacks.early_stopping=null"], tmp_path, dataset_cache)
    names = {type(c).__name__ for c in build_callbacks(cfg.callbacks)}
    assert "EarlyStopping" not in names and {"BestAndLastCheckpoint", "GradNormMonitor", "TokenThroughputMonitor"} <= names


def test_hub_model_option_loads_a_local_directory(tmp_path, dataset_cache):
    """`model=llama1b model.name_or_path=<dir>` goes through from_pretrained exactly as a hub id would."""
    cfg = compose_config([], tmp_path, dataset_cache)
    tokenizer = build_char_tokenizer()
    saved = build_model(cfg.model, cfg.precision, tokenizer)
    local = tmp_path / "my-model"
    saved.save_pretrained(local)
    tokenizer.save_pretrained(local)

    cfg = compose_config(["model=llama1b", f"model.name_or_path={local}"], tmp_path, dataset_cache)
    validate_config(cfg)
    loaded = build_model(cfg.model, cfg.precision, tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))

    result = run_train([*FAST, "model=llama1b", f"model.name_or_path={local}", "trainer.max_steps=10"],
                       tmp_path / "run", dataset_cache)
    assert "tunelab run summary" in result.stdout
