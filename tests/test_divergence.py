"""A run that goes non-finite never reports success: it stops with one line naming the step, ends FAILED in MLflow
with the reason, and keeps its last good checkpoint resumable; or, asked to, skips the bad steps and goes on. A run
that runs out of GPU memory ends the same way, its line naming what to lower or switch on."""

import math

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import FAST, compose_config, run_train, save_base_with_untrained_tokens
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.model import build_model
from tunelab.peft import apply_peft


def only_run(uri: str):
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return client, run


def error_line(result) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("callbacks", ["callbacks=default", "callbacks=none"])
def test_a_diverging_learning_rate_fails_the_run_with_one_line(tmp_path, dataset_cache, callbacks):
    # callbacks=none keeps the guard too: only `callbacks.divergence=null` lets a run go on through NaN.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fast = [arg for arg in FAST if not arg.startswith("callbacks.")]  # none has no progress bar to switch off
    result = run_train([*fast, callbacks, "optim.lr=1e4", "trainer.max_steps=60", "trainer.val_check_interval=20",
                        "export=false"], tmp_path / "run", dataset_cache, uri, check=False)
    assert result.returncode != 0
    assert error_line(result).startswith("tunelab: error: training diverged at step "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    _, run = only_run(uri)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["tunelab.failure"]
    assert not (tmp_path / "run" / "objective.json").exists()  # no summary of a success


def test_a_nan_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, dataset_cache):
    # No logging step before step 49: what stops the run is the check before the validation at step 20.
    common = [*FAST, "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.total_steps=30", "export=false",
              "trainer.log_every_n_steps=50"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    result = run_train(common, run_dir, dataset_cache, uri, check=False, script="tests/poisoned_train.py",
                       extra_env={"POISON_STEP": "14"})
    assert result.returncode != 0
    assert error_line(result).startswith("tunelab: error: training diverged at step 14: "), result.stderr[-2000:]
    assert "grad norm=nan" in error_line(result)
    _, run = only_run(uri)
    assert run.info.status == "FAILED"

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10  # the validation at step 20 never ran with bad weights
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    resumed = run_train([*common, "ckpt_path=last"], run_dir, dataset_cache, uri)  # no poison now
    assert "tunelab run summary" in resumed.stdout


def test_skip_policy_skips_the_bad_step_and_finishes(tmp_path, dataset_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_train([*FAST, "callbacks.divergence.action=skip", "export=false"], tmp_path / "run", dataset_cache, uri,
                       script="tests/poisoned_train.py", extra_env={"POISON_STEP": "5"})
    assert "tunelab run summary" in result.stdout
    client, run = only_run(uri)
    assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["val/loss"])
    assert client.get_metric_history(run.info.run_id, "train/skipped_steps")[-1].value == 1


def test_out_of_gpu_memory_ends_with_one_line_naming_what_to_lower(tmp_path, dataset_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_train([*FAST, "export=false"], tmp_path / "run", dataset_cache, uri, check=False,
                       script="tests/poisoned_train.py", extra_env={"OOM_STEP": "3"})
    assert result.returncode != 0
    line = error_line(result)
    assert line.startswith("tunelab: error: out of GPU memory at step 3: lower data.batch_size (now 32;"), result.stderr[-2000:]
    assert "data.max_length (now 48)" in line and "model.gradient_checkpointing=true" in line and "peft=lora" in line
    assert "Traceback" not in result.stderr
    _, run = only_run(uri)
    assert run.info.status == "FAILED" and "OutOfMemoryError" in run.data.tags["tunelab.failure"]


def test_divergence_in_a_multi_process_run_ends_every_rank_with_the_line_and_no_traceback(tmp_path, dataset_cache):
    # Seen on 4 H100s: each rank stopped at the NaN, but with a traceback, rank 0's stop logging the exception.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_train([*FAST, "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "export=false",
                        "trainer.log_every_n_steps=2"], tmp_path / "run", dataset_cache, uri, check=False,
                       script="tests/poisoned_train.py", extra_env={"POISON_STEP": "3"})
    assert result.returncode != 0
    assert "tunelab: error: training diverged at step 3: " in result.stderr and "Traceback" not in result.stderr, \
        result.stderr[-3000:]
    _, run = only_run(uri)
    assert run.info.status == "FAILED"


def input_gradients_of_a_row_starting_with(token: int, overrides: list[str], tmp_path, cache) -> torch.Tensor:
    """|d loss / d input embedding| at each position of a row that starts with `token`, through 16 layers."""
    cfg = compose_config(["model.config.num_hidden_layers=16", *overrides], tmp_path, cache)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.precision, tokenizer)
    ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (1, 64))
    ids[0, 0] = token
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings, labels=ids).loss.backward()
    return embeddings.grad[0].norm(dim=-1)


def test_a_row_starting_with_a_zero_embedding_token_keeps_the_gradient_finite(tmp_path, dataset_cache, caplog):
    # Issue 12, part 1: a 4-GPU LoRA run went NaN at step 11 with every loss finite. Rank 3's batch held a row
    # starting with <pad>, whose embedding a random init zeroes. A zero row keeps that position's hidden state zero
    # in every layer, where RMSNorm's backward multiplies the gradient by 1/sqrt(eps): it grew ~4000x a layer and
    # overflowed at layer 1, and the adapters of layers 0-2 got inf x 0 = NaN.
    pad = build_char_tokenizer().pad_token_id
    trapped = input_gradients_of_a_row_starting_with(pad, ["model.zero_embeddings=keep"], tmp_path, dataset_cache)
    assert not torch.isfinite(trapped[0])  # the trap, on the CPU and in float32 too
    filled = input_gradients_of_a_row_starting_with(pad, [], tmp_path, dataset_cache)
    assert torch.isfinite(filled).all() and filled[0] < 10 * filled[1:].max()  # <pad> starts a row like any token
    assert "1 token embedding was all zero: '<pad>' (0)" in caplog.text


def test_untrained_token_rows_of_a_released_model_are_filled_the_same_on_every_load(tmp_path, dataset_cache):
    # A checkpoint whose special tokens were never trained (all-zero rows) loads with those rows filled, the same
    # rows each time, so that a resumed run, an export and generate.py see the embedding the adapters trained on.
    tokenizer = build_char_tokenizer()
    untrained = save_base_with_untrained_tokens(tmp_path / "base", dataset_cache)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base").get_input_embeddings().weight
    cfg = compose_config(["model.init=pretrained", f"model.name_or_path={tmp_path / 'base'}"], tmp_path, dataset_cache)
    loads = [build_model(cfg.model, cfg.precision, tokenizer).get_input_embeddings().weight for _ in range(2)]
    rows = loads[0][untrained]
    assert torch.equal(rows, loads[1][untrained])
    scale = loads[0][len(tokenizer.all_special_ids):len(tokenizer)].norm(dim=1).mean()
    assert ((rows.norm(dim=1) > 0.5 * scale) & (rows.norm(dim=1) < 2 * scale)).all()
    others = [i for i in range(len(tokenizer)) if i not in untrained and i != tokenizer.pad_token_id]
    assert torch.equal(loads[0][others], saved[others])  # trained rows untouched
