"""QLoRA (peft=qlora): LoRA adapters over a base that loads 4-bit NF4 through bitsandbytes, on CPU here."""

import bitsandbytes as bnb
import mlflow
import pytest
import torch

from tests.conftest import FAST, compose_config, run_train
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import validate_config
from tunelab.model import build_model, count_parameters
from tunelab.peft import apply_peft, base_quantization


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory, dataset_cache):
    """The embedded tiny model saved as a local from_pretrained directory: the base QLoRA quantizes as it loads."""
    directory = tmp_path_factory.mktemp("tiny-base")
    cfg = compose_config([], directory, dataset_cache)
    torch.manual_seed(0)  # the same base whichever tests ran before in this process
    build_model(cfg.model, cfg.precision, build_char_tokenizer()).save_pretrained(directory)
    return directory


def qlora_args(base, peft: str = "qlora") -> list[str]:
    return [f"peft={peft}", "model.init=pretrained", f"model.name_or_path={base}", "model.tokenizer=char"]


def val_losses(tracking_uri: str) -> tuple[str, list]:
    """The status of the store's one run, and its val/loss history by step."""
    client = mlflow.MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    return run.info.status, sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)


def test_base_loads_4bit_and_only_adapters_train(tmp_path, dataset_cache, pretrained_tiny):
    cfg = compose_config(qlora_args(pretrained_tiny), tmp_path, dataset_cache)
    validate_config(cfg)
    plain = build_model(cfg.model, cfg.precision, build_char_tokenizer())
    quantized = build_model(cfg.model, cfg.precision, build_char_tokenizer(), base_quantization(cfg.peft))
    projection = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(projection, bnb.nn.Linear4bit) and projection.weight.dtype == torch.uint8
    assert projection.weight.quant_state.quant_type == "nf4"
    assert count_parameters(quantized)[1] == count_parameters(plain)[1]  # packed weights counted as what they stand for
    assert quantized.get_memory_footprint() < 0.6 * plain.get_memory_footprint()

    model = apply_peft(quantized, cfg.peft)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_qlora_run_learns_and_checkpoints_only_adapters(tmp_path, dataset_cache, pretrained_tiny):
    """Learning is judged against the control of LoRA over the same base unquantized, the same 20 steps: the drop in
    val/loss from the base's own (validated at step 0) is at least 0.6x the control's (0.93x here, NF4's rounding of
    the base), and the control's at least 0.25 (0.73 here). Adapters whose output was scaled by 1e-3 dropped 0.01."""
    common = [*FAST, "precision=bf16_mixed", "validate_at_start=true"]
    run_dir = tmp_path / "run"
    result = run_train([*common, *qlora_args(pretrained_tiny)], run_dir, dataset_cache)
    assert "base model loaded nf4-quantized" in result.stderr + result.stdout
    run_train([*common, *qlora_args(pretrained_tiny, peft="lora"), "export=false", "callbacks.samples=null"],
              tmp_path / "lora", dataset_cache, f"sqlite:///{tmp_path / 'lora.db'}")
    status, qlora = val_losses(f"sqlite:///{tmp_path / 'mlflow.db'}")
    lora = val_losses(f"sqlite:///{tmp_path / 'lora.db'}")[1]
    assert status == "FINISHED" and [m.step for m in qlora] == [m.step for m in lora] == [0, 9, 19]
    qlora_drop, lora_drop = qlora[0].value - qlora[-1].value, lora[0].value - lora[-1].value
    assert lora_drop > 0.25 and qlora_drop > 0.6 * lora_drop, (qlora_drop, lora_drop)

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert (run_dir / "export" / "adapter_config.json").is_file()
    assert not (run_dir / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["model.init=random"], "peft=qlora quantizes the base model as its weights load: it needs model.init=pretrained"),
    (["strategy=fsdp"], "peft=qlora does not run under strategy=fsdp"),
])
def test_qlora_refuses_what_it_cannot_do_with_one_line(tmp_path, dataset_cache, pretrained_tiny, args, message):
    result = run_train([*qlora_args(pretrained_tiny), *args], tmp_path / "run", dataset_cache, check=False, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines[-1].startswith("tunelab: error: ") and message in lines[-1], result.stderr[-2000:]
