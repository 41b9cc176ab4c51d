"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing left behind RUNNING.

train.py refuses bad input with the checks it makes before it loads any weights or starts an MLflow run:
validate_config (the config alone), then check_inputs (the tokenizer, the data rows, the model's architecture and its
LoRA targets). Most cases call those two in-process; a representative set runs the real train.py.
"""

import json
import socket

import mlflow
import pytest

from tests.conftest import FAST, compose_config, run_train
from tunelab.config import ConfigError, validate_config
from tunelab.inputs import check_inputs, load_tokenizer
from tunelab.strategy import may_have_gpus

ROW = {"instruction": "reverse", "input": "abc", "output": "cba"}
CHAT = {"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]}


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def data_file(content: str | bytes, *args: str) -> tuple[list[str], dict]:
    """Overrides that train on `content`, written to {tmp}/rows.jsonl by the test."""
    return ["data=jsonl", "data.path={tmp}/rows.jsonl", "data.batch_size=4", *args], {"rows.jsonl": content}


# (overrides, files to write under {tmp}, what the one line must say)
CASES = [
    # values of the wrong type, or out of range, in each group
    (["data.batch_size=abc"], {}, "data.batch_size=abc must be an integer >= 1"),
    (["trainer.max_steps=1.5"], {}, "trainer.max_steps=1.5 must be an integer >= -1"),
    (["optim.lr=fast"], {}, "optim.lr=fast must be a number > 0"),
    (["optim.lr=-1"], {}, "optim.lr=-1 must be > 0"),
    (["optim.betas=[0.9,1.5]"], {}, "optim.betas=[0.9, 1.5] must be a list of 2 numbers >= 0 and < 1"),
    (["optim.weight_decay=-0.1"], {}, "optim.weight_decay=-0.1 must be >= 0"),
    (["peft=lora", "peft.r=x"], {}, "peft.r=x must be an integer >= 1"),
    (["peft=lora", "peft.lora_dropout=1"], {}, "peft.lora_dropout=1 must be >= 0 and < 1"),
    (["peft=lora", "peft.target_modules=[]"], {}, "peft.target_modules=[] must be a non-empty list of module names"),
    (["data.val_size=-1"], {}, "data.val_size=-1 must be > 0"),
    (["data.max_length=1"], {}, "data.max_length=1 must be >= 2"),
    (["data.packing=yes"], {}, "data.packing=yes must be true or false"),
    (["model.gradient_checkpointing=1"], {}, "model.gradient_checkpointing=1 must be true or false"),
    (["model.dtype=float64"], {}, "model.dtype=float64 is not one of: null, float32, bfloat16, float16"),
    (["trainer.devices=abc"], {}, "trainer.devices=abc must be auto, a number of devices"),
    (["trainer.val_check_interval=2.5"], {}, "trainer.val_check_interval=2.5: a float is a fraction of an epoch"),
    (["trainer.val_check_interval=0.5"], {}, "trainer.val_check_interval=0.5 is a fraction of an epoch, which Lightning "
                                              "counts only with trainer.check_val_every_n_epoch set"),
    (["trainer.accumulate_grad_batches=0"], {}, "trainer.accumulate_grad_batches=0 must be >= 1"),
    (["kernels.loss_chunk_size=0"], {}, "kernels.loss_chunk_size=0 must be >= 1"),
    (["callbacks.divergence.action=ignore"], {}, "callbacks.divergence.action=ignore is not one of: stop, skip"),
    (["strategy=fsdp", "strategy.sharding_strategy=ALL"], {}, "strategy.sharding_strategy=ALL is not one of: FULL_SHARD"),
    (["objective.metric=val/accuracy"], {}, "objective.metric=val/accuracy is not one of"),
    (["seed=-1"], {}, "seed=-1 must be >= 0"),
    # values that do not fit together, or the machine
    (["optim.warmup_steps=10"], {}, "give optim.warmup_steps or optim.warmup_ratio, not both"),
    (["optim.warmup_ratio=null"], {}, "optim.warmup_steps and optim.warmup_ratio are both null"),
    (["optim.lr=${oc.env:TUNELAB_NO_SUCH_VARIABLE}"], {}, "optim.lr does not resolve"),
    (["data.prompt_template='{question}='"], {}, "data.prompt_template={question}= has a field {question}"),
    (["data.packing=true", "data.pack_tokens=16"], {}, "data.pack_tokens=16 is less than data.max_length=48"),
    pytest.param(["model=llama1b", "strategy=fsdp8", "precision=bf16_true"], {}, "strategy fsdp8 needs 8 GPUs, found 0",
                 marks=pytest.mark.skipif(may_have_gpus(), reason="counts this machine's GPUs, which may be there")),
    (["precision=16_mixed", "trainer.accelerator=cpu"], {}, "precision 16_mixed needs a GPU"),
    (["ckpt_path={tmp}/broken.ckpt"], {"broken.ckpt": "not a checkpoint"}, "broken.ckpt is not a PyTorch checkpoint"),
    # model, tokenizer and adapters
    (["model.name_or_path=/no/such/model", "model.init=pretrained"], {}, "model.name_or_path=/no/such/model: no such local model directory"),
    (["model.tokenizer={tmp}"], {}, "no such local tokenizer directory (it needs the files save_pretrained writes"),
    (["model.tokenizer={tmp}"], {"tokenizer_config.json": "{}"}, "cannot load its tokenizer"),
    (["model.config.model_type=nosuch"], {}, "model.config.model_type=nosuch is not a model type of transformers"),
    (["model.config.model_type=null"], {}, "model.config has no model_type"),
    (["model.config.hidden_size=abc"], {}, "model.config: Validation error for field 'hidden_size'"),
    (["model.attn_implementation=fastest"], {}, "model.attn_implementation=fastest is not an attention transformers has: use sdpa"),
    (["peft=lora", "peft.target_modules=[mlp]"], {}, "peft.target_modules=[\"mlp\"]: the model has no linear or embedding layer named mlp"),
    (["peft=lora", "peft.target_modules='q_(.*'"], {}, "peft.target_modules=q_(.* is not a regular expression"),
    # data files, and the embedded task asked for too little
    (["data=jsonl"], {}, "data=jsonl needs data.path="),
    (*data_file(""), "rows.jsonl holds no rows: write one JSON object per line"),
    (*data_file("\n\n"), "rows.jsonl holds no rows"),
    (*data_file(b'{"instruction": "\xe9", "output": "b"}\n'), "rows.jsonl is not UTF-8 text"),
    (*data_file(jsonl(ROW) + '{"instruction": "upper", output: "B"}\n'), "rows.jsonl line 2: not valid JSON"),
    (*data_file(jsonl(ROW) + '"just text"\n'), "rows.jsonl line 2 is \"just text\", not a JSON object"),
    (*data_file(jsonl(ROW, {"instruction": "upper"})), "rows.jsonl line 2 has no output; data.format=alpaca rows need"),
    (*data_file(jsonl({**ROW, "output": 5})), "rows.jsonl line 1 has output=5, not a string"),
    (*data_file(jsonl({**ROW, "output": None})), "rows.jsonl line 1 has no output"),
    (*data_file(jsonl({**ROW, "input": ["a"]})), "rows.jsonl line 1 has input=[\"a\"], not a string"),
    (*data_file(jsonl({"question": "q", "answer": "a"})), "rows.jsonl: cannot tell the data format from columns ['answer', 'question']"),
    (*data_file(jsonl(CHAT, {"messages": "reverse abc"})), "rows.jsonl line 2 has messages=\"reverse abc\", not a list of messages"),
    (*data_file(jsonl({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]})),
     "rows.jsonl line 1 has message 1 {\"content\": \"hi\"}, which is not a role and a content string"),
    (*data_file(jsonl(CHAT, CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]})),
     "rows.jsonl line 3 has message 2"),
    (*data_file(jsonl(*[{"messages": CHAT["messages"][:1]}] * 10)), "rows.jsonl: no row has an assistant message"),
    (*data_file(jsonl(CHAT), "data.format=alpaca"), "rows.jsonl line 1 has no instruction; it is a chat row: set data.format=chat"),
    (*data_file(jsonl(ROW), "data.format=chat"), "rows.jsonl line 1 has no messages; it is an alpaca row: set data.format=alpaca"),
    (*data_file(jsonl(*[{**ROW, "instruction": "x" * 60}] * 20), "data.max_length=32"),
     "rows.jsonl: no row has an answer token within data.max_length=32"),
    (*data_file(jsonl(ROW, ROW, ROW)), "rows.jsonl has 3 rows with an answer within data.max_length: 1 held out"),
    (*data_file(jsonl(*[ROW] * 10), "data.val_size=10"), "10 held out (data.val_size=10) leave 0 to train on"),
    (["data.max_length=8"], {}, "data=tiny: no row has an answer token within data.max_length=8"),
    (["data.num_examples=20"], {}, "data=tiny has 20 rows with an answer within data.max_length: 1 held out"),
]


def write_files(tmp_path, args: list[str], files: dict) -> list[str]:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return [arg.replace("{tmp}", str(tmp_path)) for arg in args]


@pytest.mark.parametrize("args, files, message", CASES, ids=[case.values[2] if hasattr(case, "values") else case[2]
                                                               for case in CASES])
def test_bad_input_is_refused_before_anything_loads(tmp_path, dataset_cache, args, files, message):
    cfg = compose_config(write_files(tmp_path, args, files), tmp_path / "run", dataset_cache)
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
        check_inputs(cfg, load_tokenizer(cfg.model))
    assert message in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


# Through the real train.py (each pays its imports, ~15 s): a wrong type, a data file, LoRA targets, the Hub offline.
TRAIN_PY_CASES = [
    (["optim.betas=3"], {}, "optim.betas=3 must be a list of 2 numbers >= 0 and < 1"),
    (*data_file(jsonl(ROW, {**ROW, "output": None})), "rows.jsonl line 2 has no output"),
    (["peft=lora", "peft.target_modules=[q_proj,query]"], {},
     "peft.target_modules=[\"q_proj\", \"query\"]: the model has no linear or embedding layer named query; "
     "those it has are down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["data=alpaca"], {}, "data.path=tatsu-lab/alpaca: cannot load this dataset from the Hugging Face Hub"),
]


@pytest.mark.parametrize("args, files, message", TRAIN_PY_CASES, ids=[message[:60] for _, _, message in TRAIN_PY_CASES])
def test_bad_input_ends_train_py_with_one_line(tmp_path, dataset_cache, args, files, message):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_train(write_files(tmp_path, args, files), tmp_path / "run", dataset_cache, check=False, timeout=120,
                       extra_env=offline)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tunelab: error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "export").exists()
    assert not (tmp_path / "mlflow.db").exists() or not mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments(filter_string="name = 'tunelab'")


def test_unreachable_tracking_server_fails_in_seconds_naming_it_without_credentials(tmp_path, dataset_cache):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends
    result = run_train(FAST, tmp_path / "run", dataset_cache, tracking_uri=f"http://alice:s3cret@127.0.0.1:{port}",
                       check=False, timeout=300)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tunelab: error: the MLflow tracking server at http://127.0.0.1:{port} does not answer"), line
    assert "s3cret" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert "parameters:" not in result.stdout + result.stderr  # refused before the model was built
    # Refused by one connection attempt: MLflow's client would retry each request with back-off for minutes.
    assert "Retrying" not in result.stdout + result.stderr and "Max retries exceeded" not in result.stderr


def test_failure_during_training_ends_the_mlflow_run_failed(tmp_path, dataset_cache):
    # Token ids of the char tokenizer go up to 100: an embedding of 10 rows fails inside the first forward pass.
    result = run_train([*FAST, "+model.config.vocab_size=10"], tmp_path / "run", dataset_cache, check=False)
    assert result.returncode != 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bf16_mixed_over_bf16_weights_warns_to_use_bf16_true(tmp_path, dataset_cache, caplog):
    validate_config(compose_config(["precision=bf16_mixed", "model.dtype=bfloat16"], tmp_path, dataset_cache))
    assert any("precision=bf16_true" in r.getMessage() for r in caplog.records)
    caplog.clear()
    validate_config(compose_config(["precision=bf16_mixed"], tmp_path, dataset_cache))
    assert not any("bf16_true" in r.getMessage() for r in caplog.records)
