"""Scale-out on CPU: DDP over gloo, sweeps whose trials are torchrun jobs, a two-"node" torchrun, placement errors."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, mlflow_runs, run_with_failing_rank, subprocess_env
from tests.services import free_port

from tunelab.strategy import may_have_gpus

# Two ranks on two shared cores: small data, few steps, one validation at the end.
SMALL = ["trainer.max_steps=8", "trainer.val_check_interval=8", "data.num_examples=300", "callbacks.progress_bar=null",
         "callbacks.early_stopping=null", "export=false", "optim.lr=3e-3"]
DDP2 = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def run(command: list[str], tmp_path: Path, cache: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(tmp_path, cache), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def train(args: list[str], run_dir: Path, tmp_path: Path, cache: Path) -> dict:
    run([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"], tmp_path, cache)
    return json.loads((run_dir / "objective.json").read_text())


def torchrun(nodes_args: list[str], args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *nodes_args, "train.py", *args, f"hydra.run.dir={run_dir}"]


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path, dataset_cache, loss):
    # Fixed-length rows whose every token is a target: the mean of two ranks' mean losses is then exactly the loss
    # of one process over both halves, so the runs must agree to float rounding, not just roughly. `chunked`: the
    # fast path's fused loss, whose gradients DDP must all-reduce like the model's own.
    data = ["data=random_tokens", "data.max_length=32", "data.num_examples=256", "logger=none", f"kernels.loss={loss}"]
    one = train([*SMALL, *data, "data.batch_size=16"], tmp_path / "one", tmp_path, dataset_cache)
    two = train([*SMALL, *data, *DDP2, "data.batch_size=8"], tmp_path / "two", tmp_path, dataset_cache)
    half = train([*SMALL, *data, "data.batch_size=8"], tmp_path / "half", tmp_path, dataset_cache)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_step"] == two["global_step"] == 8
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-5)
    # The control: half the global batch on one process trains to a visibly different model.
    assert abs(half["objective"] - one["objective"]) > 1e-3


def test_sweep_runs_each_trial_as_its_own_two_process_job(tmp_path, dataset_cache):
    sweep_dir = tmp_path / "sweep"
    result = run([sys.executable, "train.py", "-m", "hydra/launcher=torchrun", *SMALL, *DDP2, "data.batch_size=8",
                  "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}"], tmp_path, dataset_cache, timeout=400)
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"], result.stdout  # exactly two trials, no sweep per rank
    for trial in trials:
        outcome = json.loads((trial / "objective.json").read_text())
        assert outcome["world_size"] == 2 and outcome["global_step"] == 8
        assert outcome["objective"] < 4.0
        log = (trial / "torchrun.log").read_text()
        assert "Launching" not in log and "#0 :" not in log  # the job is a single run that launches no sweep
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = db.execute("SELECT r.run_uuid, p.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
                          "WHERE p.key = 'paths/output_dir'").fetchall()
        lr_params = {v for (v,) in db.execute("SELECT value FROM params WHERE key = 'optim/lr'")}
    assert sorted(Path(d).name for _, d in runs) == ["0", "1"]  # one MLflow run per trial, each in its own dir
    assert lr_params == {"0.001", "0.003"}


def test_study_sweep_trials_as_torchrun_jobs_nest_in_mlflow(tmp_path, dataset_cache):
    """The Optuna study sweeper with the torchrun launcher: each trial a 2-process job, reporting to its own trial
    and nested under the study's parent run."""
    import optuna

    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run([sys.executable, "train.py", "-m", "sweep=lora_search", "hydra/launcher=torchrun", *SMALL, *DDP2,
                  "data.batch_size=8", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
                  "hydra.sweeper.study_name=ddp", f"hydra.sweep.dir={sweep_dir}"], tmp_path, dataset_cache, timeout=400)
    trials = optuna.load_study(study_name="ddp", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], result.stdout[-3000:]
    assert all(t.intermediate_values == {8: t.value} for t in trials)  # the job reported to its own trial
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["paths/output_dir"] for c in children} == {str(sweep_dir / "0"), str(sweep_dir / "1")}
    assert all(json.loads((sweep_dir / n / "objective.json").read_text())["world_size"] == 2 for n in "01")


def test_a_failing_trial_is_reported_failed_and_the_sweep_goes_on(tmp_path, dataset_cache):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=torchrun", *SMALL, "trainer.max_steps=4",
         "trainer.val_check_interval=4", "logger=none", "optim.lr=1e-3,-1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT, env=subprocess_env(tmp_path, dataset_cache), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # the basic sweeper re-raises the failed trial once all have run
    assert "trial #1 failed (exit code 1): tunelab: error: optim.lr=-1 must be > 0" in result.stderr
    assert (sweep_dir / "0" / "objective.json").is_file()


def test_two_node_torchrun_on_localhost_runs_the_same_job(tmp_path, dataset_cache):
    args = [*SMALL, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
            "data.batch_size=8", "logger=none"]
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, dataset_cache)
    nodes = [subprocess.Popen(torchrun([*rendezvous, f"--node-rank={rank}"], args, run_dir), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    outcome = json.loads((run_dir / "objective.json").read_text())
    assert outcome["world_size"] == 2 and outcome["global_step"] == 8


@pytest.mark.parametrize("args, message", [
    (["strategy=fsdp1", "strategy.accelerator=cpu"], "strategy fsdp1 needs GPUs"),
    pytest.param(["strategy=fsdp8"], "strategy fsdp8 needs 8 GPUs, found 0",
                 marks=pytest.mark.skipif(may_have_gpus(), reason="counts this machine's GPUs, which may be there")),
    (["strategy.name=ddp_typo"], "strategy.name=ddp_typo is not a Lightning strategy"),
    (["trainer.num_nodes=2"], "trainer.num_nodes=2 needs a multi-node launch"),
    (["strategy=fsdp", "strategy.auto_wrap=everything"], "strategy.auto_wrap=everything is not one of"),
    (["strategy=fsdp1", "peft=lora", "strategy.state_dict_type=full"], "peft=lora under strategy=fsdp1 writes sharded checkpoints only"),
])
def test_bad_placement_fails_with_one_line_before_any_process_starts(tmp_path, dataset_cache, args, message):
    result = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                            env=subprocess_env(tmp_path, dataset_cache), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: "), result.stderr[-2000:]
    if message:
        assert message in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_torchrun_process_count_must_match_the_config(tmp_path, dataset_cache):
    command = torchrun(["--standalone", "--nproc-per-node=2"], [*DDP2[:2], "trainer.devices=3", "logger=none"], tmp_path / "run")
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(tmp_path, dataset_cache), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "torchrun started 2 processes per node, 2 in all, but the config asks for devices=3 x num_nodes=1" in result.stderr


@pytest.mark.parametrize("model_type, layer", [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")])
def test_fsdp_wraps_the_decoder_layer_class_of_whatever_model_is_loaded(model_type, layer):
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.strategy import build_strategy

    fsdp = OmegaConf.load(ROOT / "conf" / "strategy" / "fsdp1.yaml")
    fsdp.activation_checkpointing = True
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    strategy = build_strategy(fsdp, model)
    assert {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes} == {layer}
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert {c.__name__ for c in checkpointed._module_classes} == {layer}
    assert strategy.kwargs.get("use_orig_params", True) is True

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    policy = build_strategy(fsdp, lora).kwargs["auto_wrap_policy"]
    wrapped = [name for name, module in lora.named_modules() if policy._lambda_fn(module)]
    assert sum(name.endswith(("layers.0", "layers.1")) for name in wrapped) == 2
    adapters = [name for name in wrapped if ".lora_" in name]
    assert len(adapters) == 2 * 2 * 2  # lora_A and lora_B of q and v in each of 2 layers: units of their own
    assert all(p.requires_grad for name in adapters for p in lora.get_submodule(name).parameters())


@pytest.mark.parametrize("peft_option", ["lora", "none"])
def test_fsdp_export_holds_every_trained_weight_whole(peft_option, tmp_path, dataset_cache):
    # Each trainable matrix is sharded over the 2 ranks; the export must hold all of it, not rank 0's slice, and for
    # LoRA must find the adapter keys although FSDP's wrappers rename the modules they sit in.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import compose_config
    from tunelab.char_tokenizer import build_char_tokenizer
    from tunelab.model import build_model

    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/fsdp_export_worker.py",
         str(tmp_path), peft_option], tmp_path, dataset_cache)
    expected = torch.load(tmp_path / "expected.pt")
    if peft_option == "lora":
        cfg = compose_config(["peft=lora"], tmp_path, dataset_cache)
        restored = PeftModel.from_pretrained(build_model(cfg.model, cfg.precision, build_char_tokenizer()), tmp_path / "export")
    else:
        restored = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    exported = dict(restored.named_parameters())
    assert sorted(exported.keys() & expected.keys()) == sorted(expected)
    assert [name for name, value in expected.items() if not torch.equal(exported[name], value)] == []


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_ends_the_whole_run_with_an_error(failing_rank, tmp_path, dataset_cache):
    run_dir = tmp_path / "run"
    result = run_with_failing_rank([*SMALL, *DDP2], run_dir, dataset_cache, failing_rank, timeout=240)
    assert result.returncode != 0  # 1, or -9 where rank 0's launcher killed it on seeing a rank fail
    assert f"rank {failing_rank} fails at step 3" in result.stdout + result.stderr  # what the user's terminal shows
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [run.info.status for run in parents] == ["FAILED"] and children == []
    assert not list(run_dir.glob("checkpoints/*"))  # it failed before the first checkpoint (step 8): none half-written
    assert subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout == b""  # no rank left behind
