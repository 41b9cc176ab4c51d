"""strategy=fsdp is FSDP2 (tunelab/fsdp2.py): per-parameter sharding over CPU ranks (gloo), so the sharded path trains,
checkpoints and exports here as it does on GPUs. Fixed-length random-token rows whose every token is a target make two
ranks' mean losses exactly one process's over both halves, so sharded and unsharded runs must agree to rounding."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy
from torch.distributed.tensor import DTensor

from tests.conftest import compose_config, run_train
from tunelab.fsdp2 import shard_model
from tunelab.model import build_model
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.peft import apply_peft

STEPS = ["trainer.max_steps=20", "trainer.val_check_interval=10", "optim.lr=3e-3", "callbacks.progress_bar=null",
         "callbacks.early_stopping=null", "callbacks.samples=null", "validate_at_start=false", "logger=csv",
         "callbacks.model_checkpoint.save_top_k=-1", "trainer.log_every_n_steps=1"]
DATA = ["data=random_tokens", "data.max_length=32", "data.num_examples=400"]
ONE = [*STEPS, *DATA, "data.batch_size=16"]
FSDP = ["strategy=fsdp", "trainer.accelerator=cpu"]
TWO = [*STEPS, *DATA, *FSDP, "trainer.devices=2", "data.batch_size=8"]


def objective(run_dir: Path) -> dict:
    return json.loads((run_dir / "objective.json").read_text())


def metric(run_dir: Path, name: str) -> dict[int, float]:
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def train_losses(run_dir: Path) -> dict[int, float]:
    """The loss of rank 0's share of each step's batch."""
    return metric(run_dir, "train/loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset_cache) -> Path:
    """One process and two FSDP2 ranks at the same global batch, full fine-tune and LoRA (export on for the sharded
    ones; LoRA with the fused loss), then the two-rank full fine-tune resumed from its step-10 checkpoint on two ranks and on one."""
    root = tmp_path_factory.mktemp("fsdp2")
    # Dropout masks are drawn per rank: they would differ. The LoRA runs take the fused loss (the GPU default), which
    # reads the output projection's weight outside the model's forward.
    lora = ["peft=lora", "peft.lora_dropout=0", "kernels.loss=chunked"]
    for name, args in (("one", [*ONE, "export=false"]), ("two", TWO),
                       ("one_lora", [*ONE, *lora, "export=false"]), ("two_lora", [*TWO, *lora])):
        run_train(args, root / name, dataset_cache)
    step10 = f"ckpt_path={root / 'two' / 'checkpoints' / 'step000010.ckpt'}"
    run_train([*TWO, step10, "export=false"], root / "resumed", dataset_cache)
    run_train([*STEPS, *DATA, *FSDP, "trainer.devices=1", "data.batch_size=16", step10, "export=false"],
              root / "resharded", dataset_cache)
    return root


@pytest.mark.parametrize("peft", ["", "_lora"])
def test_two_ranks_train_as_one_process_with_the_same_global_batch(runs, peft):
    one, two = objective(runs / f"one{peft}"), objective(runs / f"two{peft}")
    assert (one["world_size"], two["world_size"], two["global_step"]) == (1, 2, 20)
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-4)  # val/loss, averaged over the ranks
    validations = metric(runs / f"two{peft}", "val/loss")
    assert abs(validations[9] - validations[19]) > 1e-3  # it trained between the two validations


def checkpoint_tensors(directory: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A sharded (DCP) checkpoint gathered into one dict, as the shards on disk hold it."""
    dcp_to_torch_save(directory, tmp_path / "whole.pt")
    return torch.load(tmp_path / "whole.pt", weights_only=False)


def test_the_export_holds_every_rank_s_shard_of_the_trained_weights(runs, tmp_path):
    saved = checkpoint_tensors(runs / "two" / "checkpoints" / "last.ckpt", tmp_path)["state_dict"]
    exported = load_file(runs / "two" / "export" / "model.safetensors")
    weights = {key.removeprefix("model."): value for key, value in saved.items()}
    assert exported.keys() <= weights.keys() and len(exported) > 10
    assert [key for key, value in exported.items() if not torch.equal(value, weights[key])] == []
    assert all(value.shape == weights[key].shape for key, value in exported.items())


def test_lora_keeps_gradients_and_optimizer_state_for_the_adapters_only(runs):
    keys = FileSystemReader(runs / "two_lora" / "checkpoints" / "last.ckpt").read_metadata().state_dict_metadata
    moments = [key for key in keys if key.startswith("optimizer_0.state.") and key.endswith(".exp_avg")]
    adapters = [key for key in keys if key.startswith("state_dict.") and ".lora_" in key]
    assert len(moments) == len(adapters) > 0
    assert all(".lora_" in key for key in moments)
    exported = load_file(runs / "two_lora" / "export" / "adapter_model.safetensors")
    assert len(exported) == len(adapters)


def test_a_mid_epoch_resume_on_two_ranks_continues_as_the_straight_run(runs):
    straight, resumed = train_losses(runs / "two"), train_losses(runs / "resumed")
    assert sorted(resumed) == list(range(10, 20))
    assert resumed == pytest.approx({step: straight[step] for step in resumed}, rel=1e-5)
    assert objective(runs / "resumed")["objective"] == pytest.approx(objective(runs / "two")["objective"], rel=1e-5)


def test_a_checkpoint_of_two_ranks_resumes_resharded_on_one(runs):
    # One rank's loss is over the whole global batch, as the one-process run's, which two ranks match.
    whole_batch, resharded = train_losses(runs / "one"), train_losses(runs / "resharded")
    assert objective(runs / "resharded")["world_size"] == 1
    assert sorted(resharded) == list(range(10, 20))
    assert resharded == pytest.approx({step: whole_batch[step] for step in resharded}, rel=1e-4)
    assert objective(runs / "resharded")["objective"] == pytest.approx(objective(runs / "two")["objective"], rel=1e-4)


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    dist.destroy_process_group()


def test_each_decoder_layer_is_a_unit_holding_its_frozen_base_and_adapters(process_group, tmp_path, dataset_cache):
    cfg = compose_config(["peft=lora"], tmp_path, dataset_cache)
    model = apply_peft(build_model(cfg.model, cfg.precision, build_char_tokenizer()), cfg.peft)
    layers = [module for module in model.modules() if type(module).__name__ == "LlamaDecoderLayer"]
    shard_model(model, process_group, reshard_after_forward=True, mp_policy=MixedPrecisionPolicy(),
                offload_policy=OffloadPolicy())
    assert layers and all(isinstance(layer, FSDPModule) for layer in layers)
    assert isinstance(model, FSDPModule)
    for layer in layers:
        parameters = dict(layer.named_parameters())
        assert all(isinstance(p, DTensor) for p in parameters.values())
        assert {p.requires_grad for p in parameters.values()} == {True, False}  # one unit, both kinds


@pytest.mark.parametrize("args, message", [
    ([*FSDP, "strategy.cpu_offload=true"], "strategy.cpu_offload=true keeps fsdp's GPU state in CPU memory"),
    (["strategy=fsdp1", "strategy.accelerator=cpu"], "strategy fsdp1 needs GPUs"),
    ([*FSDP, "strategy.reduce_dtype=float16"], "strategy.reduce_dtype=float16 is not one of"),
])
def test_bad_fsdp_settings_end_in_one_line(tmp_path, dataset_cache, args, message):
    result = run_train(args, tmp_path / "run", dataset_cache, check=False, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"tunelab: error: {message}"), result.stderr[-1500:]
