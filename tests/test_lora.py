"""LoRA: only the adapters train, checkpoints hold only them, and the adapter exports with save_pretrained."""

import lightning.pytorch as pl
import pytest
import torch
from peft import PeftModel

from tests.conftest import FAST, compose_config, run_train
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data import build_datamodule
from tunelab.model import build_model, count_parameters
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.peft import apply_peft


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_only_adapter_parameters_change(tmp_path, dataset_cache, checkpointing):
    cfg = compose_config(["peft=lora", "data.num_examples=200", f"model.gradient_checkpointing={checkpointing}"], tmp_path, dataset_cache)
    tokenizer = build_char_tokenizer()
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(CausalLMModule(model, cfg.optim, adapter_only_checkpoints=True), datamodule=build_datamodule(cfg.data, tokenizer))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed == {name for name in before if "lora_" in name}


def test_adapter_checkpoint_is_small_and_exports(tmp_path, dataset_cache):
    run_train([*FAST, "peft=lora"], tmp_path / "run", dataset_cache)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    cfg = compose_config([], tmp_path, dataset_cache)
    full_model_bytes = 4 * count_parameters(build_model(cfg.model, cfg.precision, build_char_tokenizer()))[1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_size < 0.3 * full_model_bytes

    export = tmp_path / "run" / "export"
    assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
    base = build_model(cfg.model, cfg.precision, build_char_tokenizer())
    restored = PeftModel.from_pretrained(base, export)
    adapters = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    for name, param in restored.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, adapters[name]), name
