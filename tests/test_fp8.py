"""precision=fp8: torchao's float8 matmuls in the decoder's linear layers (tunelab/float8.py).

Its speed is a GPU's matter (`make bench`, BENCHMARKS.md). Here, on the CPU with float8 emulated: which layers
convert, that training really runs through them (the same steps' losses differ from bf16's, by little), that LoRA's
adapters and the output projection stay bf16, that checkpoints keep bf16's keys, and the one line a CPU run gets.
"""

import copy
import csv
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torchao.float8.float8_linear import Float8Linear
from transformers import AutoModelForCausalLM

from tests.conftest import FAST, compose_config, run_train
from tunelab.config.placement import check_float8
from tunelab.errors import ConfigError
from tunelab.model import architecture_config, build_tokenizer
from tunelab.precision import apply_float8
from tunelab.strategy import may_have_gpus

EMULATED = ["precision=fp8", "precision.float8.emulate=true", "precision.float8.layers=all"]


def converted(model: nn.Module) -> set[str]:
    return {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, Float8Linear)}


@pytest.mark.parametrize("recipe, expected", [
    # torchao's thresholds: tensorwise keeps k/v (512 x 2048) bf16, rowwise also every matrix 2048 rows tall.
    ("tensorwise", {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("rowwise", {"gate_proj", "up_proj"}),
])
def test_llama1b_converts_the_large_decoder_matmuls_and_never_lm_head(tmp_path, dataset_cache, recipe, expected):
    cfg = compose_config(["model=llama1b", "model.init=random", "model.tokenizer=char", "precision=fp8",
                          f"precision.float8.recipe={recipe}"], tmp_path, dataset_cache)
    with torch.device("meta"):  # the real architecture, no memory
        model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, build_tokenizer(cfg.model)),
                                                 dtype=torch.bfloat16)
    apply_float8(model, cfg.precision)
    assert converted(model) == expected
    layers = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert len(layers) == 16 * len(expected)
    assert type(model.lm_head) is nn.Linear


def test_lora_runs_the_frozen_base_in_float8_and_trains_adapters_outside_it(tmp_path, dataset_cache):
    cfg = compose_config([*EMULATED, "peft=lora"], tmp_path, dataset_cache)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, build_tokenizer(cfg.model)),
                                             dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    apply_float8(model, cfg.precision)
    bases = {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}
    assert any(name.endswith("q_proj.base_layer") for name in bases)
    assert not any("lora_" in name for name in bases)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)


def test_without_gradients_the_layers_run_their_bf16_matmul(tmp_path, dataset_cache):
    """Validation, generated samples and DPO's reference pass see the bf16 model that is exported."""
    cfg = compose_config(EMULATED, tmp_path, dataset_cache)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, build_tokenizer(cfg.model)),
                                             dtype=torch.bfloat16)
    plain = copy.deepcopy(model)
    apply_float8(model, cfg.precision)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not torch.equal(model(input_ids=ids).logits.detach(), plain(input_ids=ids).logits.detach())


def metrics(run_dir) -> list[dict]:
    return list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))


def test_an_emulated_float8_run_follows_bf16_closely_and_keeps_its_checkpoint_keys(tmp_path, dataset_cache):
    common = [*FAST, "trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.log_every_n_steps=1",
              "logger=csv", "export=false", "validate_at_start=false", "callbacks.samples=null"]
    runs = {}
    for name, precision in (("bf16", ["precision=bf16_true"]), ("fp8", EMULATED)):
        run_train([*common, *precision], tmp_path / name, dataset_cache)
        runs[name] = {int(r["step"]): float(r["train/loss"]) for r in metrics(tmp_path / name) if r["train/loss"]}
    steps = sorted(runs["bf16"])
    assert steps == sorted(runs["fp8"]) and len(steps) == 12
    gaps = [abs(runs["fp8"][s] - runs["bf16"][s]) / runs["bf16"][s] for s in steps]
    assert gaps[0] > 0, "the first step's loss equals bf16's: no matmul ran in float8"
    assert max(gaps) < 0.05, gaps
    keys = {name: set(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
            for name in runs}
    assert keys["fp8"] == keys["bf16"]
    assert json.loads((tmp_path / "fp8" / "objective.json").read_text())["global_step"] == 12


@pytest.mark.parametrize("overrides, message", [
    (["peft=qlora"], "precision=fp8 does not combine with peft=qlora"),
    (["strategy=fsdp1"], "precision=fp8 does not run under strategy=fsdp1"),
    (["precision.value=bf16-mixed"], "precision=fp8 trains bfloat16 weights with float8 matmuls: it needs precision.value=bf16-true"),
])
def test_float8_refuses_what_it_cannot_combine_with(tmp_path, dataset_cache, overrides, message):
    cfg = compose_config(["precision=fp8", "precision.float8.emulate=true", *overrides], tmp_path, dataset_cache)
    with pytest.raises(ConfigError, match=message):
        check_float8(cfg)


@pytest.mark.skipif(may_have_gpus(), reason="a machine with a float8 GPU would run it")
def test_fp8_on_the_cpu_ends_train_py_with_one_line(tmp_path, dataset_cache):
    result = run_train(["precision=fp8"], tmp_path / "run", dataset_cache, check=False, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tunelab: error: precision=fp8 needs an NVIDIA GPU with float8 matmuls"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
