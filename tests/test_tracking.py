"""What a run tells MLflow about itself, in-process: a name that sets it apart, the data it trained on as its inputs,
system metrics on GPUs, and the UI address `make ui` prints. The rendered UI: tests/test_mlflow_ui.py."""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.mlflow_ui import main as print_ui_address
from tunelab.system_metrics import wants_system_metrics


def test_run_name_tells_model_data_peft_and_its_run_dir(tmp_path, dataset_cache):
    cfg = compose_config(["peft=lora", "data=jsonl", "data.path=rows.jsonl"], tmp_path, dataset_cache)
    run_dir = Path(cfg.hydra.run.dir)  # outputs/<date>/<time to the microsecond>
    assert cfg.logger.run_name == f"tiny-jsonl-lora-{run_dir.name}"


def jsonl_inputs(tmp_path, cache, path):
    from tunelab.data import build_datamodule
    from tunelab.dataset_inputs import dataset_inputs

    cfg = compose_config(["data=jsonl", f"data.path={path}", "data.max_length=64", "data.val_size=4"], tmp_path, cache)
    datamodule = build_datamodule(cfg.data, build_char_tokenizer())
    datamodule.setup("fit")
    return datamodule, {i.tags[0].value: i.dataset for i in dataset_inputs(datamodule)}


def write_rows(path: Path, answer: str, mtime: int) -> None:
    rows = [{"instruction": f"upper ab{i}", "input": "", "output": f"{answer}{i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    os.utime(path, (mtime, mtime))


def test_dataset_inputs_name_the_file_count_the_rows_and_digest_what_was_trained_on(tmp_path, dataset_cache):
    path = tmp_path / "rows.jsonl"
    write_rows(path, "AB", mtime=1_700_000_000)
    datamodule, inputs = jsonl_inputs(tmp_path, dataset_cache, path)
    assert set(inputs) == {"training", "validation"}
    train, val = inputs["training"], inputs["validation"]
    assert train.name == val.name == "rows.jsonl"
    assert train.source_type == "local" and json.loads(train.source) == {"uri": str(path)}
    assert json.loads(train.profile) == {"num_rows": len(datamodule.train)} and len(datamodule.train) == 36
    assert json.loads(val.profile) == {"num_rows": 4}
    assert len(train.digest) == 8 and train.digest != val.digest

    _, again = jsonl_inputs(tmp_path, dataset_cache, path)  # another run over the same data: the same digests
    assert [again[c].digest for c in ("training", "validation")] == [train.digest, val.digest]
    write_rows(path, "CD", mtime=1_700_000_100)  # the file changed
    _, changed = jsonl_inputs(tmp_path, dataset_cache, path)
    assert changed["training"].digest != train.digest


def test_random_token_inputs_count_the_generated_rows():
    from tunelab.data import RandomTokenDataModule
    from tunelab.dataset_inputs import dataset_inputs

    datamodule = RandomTokenDataModule(build_char_tokenizer(), num_examples=64, max_length=16, batch_size=4, val_size=8, seed=3)
    inputs = {i.tags[0].value: i.dataset for i in dataset_inputs(datamodule)}
    assert {c: json.loads(d.profile)["num_rows"] for c, d in inputs.items()} == {"training": 64, "validation": 8}
    assert inputs["training"].name == "random-tokens" and inputs["training"].source_type == "code"
    assert inputs["training"].digest != inputs["validation"].digest


def test_system_metrics_by_default_only_where_the_run_trains_on_gpus():
    assert wants_system_metrics("auto", "cuda") and not wants_system_metrics("auto", "cpu")
    assert wants_system_metrics(True, "cpu") and not wants_system_metrics(False, "cuda")


def test_ui_address_waits_for_the_experiment_without_creating_a_store(tmp_path, capsys):
    store = tmp_path / "mlflow.db"
    print_ui_address(["--store", f"sqlite:///{store}", "--ui", "http://127.0.0.1:5000"])
    assert "no experiment 'tunelab' in this store yet" in capsys.readouterr().out
    assert not store.exists()


def test_an_inline_chat_template_too_long_for_a_param_is_logged_whole_with_its_digest_as_the_param(tmp_path,
                                                                                                 dataset_cache):
    """MLflow params hold 250 characters through Lightning's logger, which cut longer ones silently; a Jinja template
    given inline in model.chat_template runs to thousands."""
    import hashlib

    import yaml
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    from tunelab.logger import log_run_config

    template = json.loads((Path(__file__).parent / "chat_templates.json").read_text())["gemma2"]
    assert len(template) > 250
    cfg = compose_config(["logger=mlflow"], tmp_path, dataset_cache)
    with open_dict(cfg):
        cfg.model.chat_template = template
        del cfg["hydra"]  # as train.py gets the config
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="t", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    log_run_config(logger, cfg, {"trainable_params": 1})
    client = MlflowClient(uri)
    params = client.get_run(logger.run_id).data.params
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    assert params["model/chat_template"] == f"sha256:{digest} (whole in config.yaml)"
    assert params["model/init"] == "random" and params["trainable_params"] == "1"  # short values stay as they are
    logged = yaml.safe_load(open(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path))))
    assert logged["model"]["chat_template"] == template
