"""AdamW parameter groups and the warmup-cosine schedule, checked on a real Trainer run."""

import math

import mlflow
import pytest

from tests.conftest import FAST, compose_config, run_train
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.model import build_model
from tunelab.optim import build_optimizer, warmup_cosine
from tunelab.peft import apply_peft


def test_no_weight_decay_on_biases_and_norms(tmp_path, dataset_cache):
    cfg = compose_config(["+model.config.attention_bias=true"], tmp_path, dataset_cache)
    model = build_model(cfg.model, cfg.precision, build_char_tokenizer())
    optimizer = build_optimizer(model, cfg.optim)
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"decay": 0.01, "no_decay": 0.0}
    for name, param in model.named_parameters():
        no_decay = name.endswith(".bias") or "norm" in name
        assert (id(param) in by_group["no_decay"]) == no_decay, name
        assert (id(param) in by_group["decay"]) == (not no_decay), name


def test_only_trainable_parameters_reach_the_optimizer(tmp_path, dataset_cache):
    cfg = compose_config(["peft=lora"], tmp_path, dataset_cache)
    model = apply_peft(build_model(cfg.model, cfg.precision, build_char_tokenizer()), cfg.peft)
    optimizer = build_optimizer(model, cfg.optim)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert all("lora_" in n for n, p in model.named_parameters() if id(p) in in_optimizer)


def test_schedule_shape():
    multiplier = warmup_cosine(total_steps=21, warmup=4, min_lr_ratio=0.2)
    # Warm-up: (step + 1) / (warmup + 1), so the first step already moves and step 4 is the peak.
    assert [multiplier(step) for step in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # Cosine over the 16 steps from the peak to the last step (index 20): 0.2 + 0.8 * (1 + cos(pi * (step - 4) / 16)) / 2.
    assert multiplier(8) == pytest.approx(0.2 + 0.4 * (1 + math.sqrt(2) / 2))   # a quarter of the way: cos(pi/4)
    assert multiplier(12) == pytest.approx(0.6)                                 # half way: cos(pi/2) = 0
    assert multiplier(16) == pytest.approx(0.2 + 0.4 * (1 - math.sqrt(2) / 2))  # three quarters: cos(3pi/4)
    assert multiplier(20) == pytest.approx(0.2)
    assert multiplier(25) == pytest.approx(0.2)  # past the end it stays at the floor


def test_lr_per_optimizer_step_with_gradient_accumulation(tmp_path, dataset_cache):
    """400 examples, 20 held out, batch 8 → 47 batches; accumulating 4 makes 12 optimizer steps, and the
    schedule must span exactly those: warmup to the peak at step 3, cosine down to lr * 0.1 at step 11."""
    args = [*FAST, "trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.val_check_interval=1.0",
            "trainer.check_val_every_n_epoch=1", "data.batch_size=8", "data.val_size=20", "trainer.accumulate_grad_batches=4",
            "optim.lr=0.002", "optim.warmup_steps=3", "optim.warmup_ratio=null", "trainer.log_every_n_steps=1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_train(args, tmp_path / "run", dataset_cache, tracking_uri=uri)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    lr_key = next(k for k in run.data.metrics if k.startswith("lr-") and k.endswith("decay") and "no_decay" not in k)
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, lr_key)}
    assert sorted(lrs) == list(range(12)), lrs
    # Warm-up 0.002 x (step + 1) / 4 to the peak at step 3, then 0.002 x (0.1 + 0.45 x (1 + cos(pi x (step - 3) / 8)))
    # down to step 11, worked out by hand: cos(pi/8) = 0.92388, cos(pi/4) = 0.70711, cos(3pi/8) = 0.38268.
    expected = [0.0005, 0.001, 0.0015, 0.002, 0.00193149, 0.00173640, 0.00144442, 0.0011, 0.00075558, 0.00046360,
                0.00026851, 0.0002]
    assert [lrs[step] for step in range(12)] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("model, peft, lr", [
    ("tiny", "none", 3e-3), ("tiny", "lora", 3e-3),
    ("llama1b", "none", 2e-5), ("llama1b", "lora", 2e-4), ("llama8b", "qlora", 1e-4), ("qwen2_5_7b", "none", 1e-5),
])
def test_default_learning_rate_is_the_one_the_model_recommends_for_full_or_adapter_tuning(tmp_path, model, peft, lr):
    # Issue 12: llama1b took the tiny model's 3e-3 and a full fine-tune went NaN within 40 steps.
    cfg = compose_config([f"model={model}", f"peft={peft}"], tmp_path, tmp_path)
    assert cfg.optim.lr == pytest.approx(lr)
    assert compose_config([f"model={model}", f"peft={peft}", "optim.lr=0.5"], tmp_path, tmp_path).optim.lr == 0.5
