"""Every option of every config group composes, validates where this machine can run it (and gives its one error line
where it cannot), and is turned into its object by the module that builds its group, without downloading anything; a
hub model option loads from a local directory made by save_pretrained."""

import copy
import importlib.util

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from tests.conftest import CONF, FAST, compose_config, run_train
from tunelab.callbacks import build_callbacks
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import validate_config
from tunelab.data import InstructionDataModule, RandomTokenDataModule, build_datamodule
from tunelab.data.preference import PreferenceDataModule
from tunelab.ddp import SameStreamDDPStrategy
from tunelab.fsdp2 import FSDP2Strategy
from tunelab.kernel_choice import liger_available, resolve_kernels
from tunelab.kernels import FusedLinearLoss, apply_kernels, build_loss, lean_rms_norm_forward, model_loss
from tunelab.logger import build_logger
from tunelab.model import build_model, count_parameters
from tunelab.modules.base import build_module
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.modules.dpo import DPOModule
from tunelab.modules.grpo import GRPOModule
from tunelab.optim import build_optimizer, build_scheduler
from tunelab.peft import apply_peft, base_quantization
from tunelab.strategy import build_strategy, gpu_count, strategy_accelerator, strategy_devices
from tunelab.trainer import build_trainer

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, option.stem) for group in GROUPS for option in sorted((CONF / group).glob("*.yaml"))]
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# What each option must build: every conf/<group>/<option>.yaml has an entry, and an option without one fails.
EXPECTED = {
    ("callbacks", "default"): ["BestAndLastCheckpoint", "LearningRateMonitor", "EarlyStopping", "GradNormMonitor",
                               "TokenThroughputMonitor", "RunProgressBar", "DivergenceGuard", "PreemptionCheckpoint",
                               "GenerationSamples"],
    ("callbacks", "none"): ["DivergenceGuard"],  # none keeps the guard
    ("data", "alpaca"): (InstructionDataModule, {"source": "hub", "path": "tatsu-lab/alpaca", "format": "alpaca",
                                                 "max_length": 512, "batch_size": 8}),
    ("data", "jsonl"): (InstructionDataModule, {"source": "jsonl", "format": "auto", "max_length": 1024, "batch_size": 8}),
    ("data", "mix"): (InstructionDataModule, {"sources": [("reverse", "jsonl", 3.0), ("upper", "jsonl", 1.0)],
                                              "max_length": 1024, "batch_size": 8}),
    ("data", "pairs"): (PreferenceDataModule, {"source": "jsonl", "format": "auto", "max_length": 1024, "batch_size": 4}),
    ("data", "random_tokens"): (RandomTokenDataModule, {"num_examples": 256, "max_length": 2048, "batch_size": 4,
                                                        "val_size": 8}),
    ("data", "tiny"): (InstructionDataModule, {"source": "tiny", "num_examples": 4000, "max_length": 48, "batch_size": 32}),
    ("data", "tiny_chat"): (InstructionDataModule, {"source": "tiny_chat", "format": "chat", "max_length": 96,
                                                    "train_on": "all_assistant", "truncation": "cut_turns"}),
    ("data", "tiny_flawed"): (InstructionDataModule, {"source": "tiny_flawed", "num_examples": 4000, "max_length": 48,
                                                      "batch_size": 32}),
    ("data", "tiny_pairs"): (PreferenceDataModule, {"source": "tiny_pairs", "num_examples": 2000, "format": "alpaca",
                                                    "max_length": 48, "batch_size": 16}),
    # (tasks, limit, batch size, base too); auto: on the default data=tiny, with lm_eval here (tests/test_eval.py: off)
    ("eval", "auto"): (["tunelab_tiny", "tunelab_tiny_choice"], 100, 32, True),
    ("eval", "hub"): (["arc_easy"], 500, 16, True),
    ("eval", "none"): None,
    ("eval", "tiny"): (["tunelab_tiny", "tunelab_tiny_choice"], 100, 32, True),
    # its own values over the groups it picks (warm-up: 0.03 of 2000 steps)
    ("experiment", "llama1b_alpaca_lora"): {"choices": {"model": "llama1b", "data": "alpaca", "peft": "lora",
                                                        "precision": "bf16_true"},
                                            "experiment_name": "llama1b-alpaca-lora", "lr": 2e-4, "warmup_steps": 60,
                                            "max_steps": 2000, "val_check_interval": 200, "accumulate_grad_batches": 4},
    ("experiment", "tiny_dpo"): {"choices": {"model": "sft_export", "data": "tiny_pairs", "module": "dpo"},
                                 "experiment_name": "tiny-dpo", "lr": 3e-5, "max_steps": 40, "val_check_interval": 10,
                                 "builds": (DPOModule, PreferenceDataModule)},
    ("experiment", "tiny_grpo"): {"choices": {"model": "sft_export", "data": "tiny_flawed", "module": "grpo"},
                                  "experiment_name": "tiny-grpo", "lr": 2e-4, "max_steps": 60, "val_check_interval": 20,
                                  "builds": (GRPOModule, InstructionDataModule)},
    # (on the CPU, on a GPU): what `auto` resolves to, per piece
    ("kernels", "auto"): ({"loss": "plain", "compile": "none", "fused_ops": "none"},
                          {"loss": "liger" if liger_available() else "chunked", "compile": "layers", "fused_ops": "native"}),
    ("kernels", "none"): ({"loss": "plain", "compile": "none", "fused_ops": "none"},) * 2,
    ("logger", "csv"): CSVLogger,
    ("logger", "mlflow"): MLFlowLogger,
    ("logger", "none"): None,
    # (class, parameters of the published checkpoint, which the architecture block must reproduce)
    ("model", "llama1b"): ("LlamaForCausalLM", 1_235_814_400),
    ("model", "llama8b"): ("LlamaForCausalLM", 8_030_261_248),
    ("model", "qwen2_5_0_5b"): ("Qwen2ForCausalLM", 494_032_768),
    ("model", "qwen2_5_7b"): ("Qwen2ForCausalLM", 7_615_616_512),
    ("model", "sft_export"): ("LlamaForCausalLM", None),
    ("model", "tiny"): ("LlamaForCausalLM", None),
    # (class, its settings)
    ("module", "causal_lm"): (CausalLMModule, {}),
    ("module", "dpo"): (DPOModule, {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "reference": "copy"}),
    ("module", "grpo"): (GRPOModule, {"num_generations": 8, "max_new_tokens": 32, "epsilon_low": 0.2, "epsilon_high": 0.2,
                                      "beta": 0.0, "reference": "none", "loss_type": "sequence_mean"}),
    ("optim", "adamw_cosine"): {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": {"decay": 0.01, "no_decay": 0.0},
                                # 100 steps: 5 of warm-up ((step + 1) / 6 of the peak), the cosine down to 0.1 at step 99
                                "multipliers": {0: 1 / 6, 2: 3 / 6, 5: 1.0, 99: 0.1}},
    # (LoRA rank, alpha, target modules), or None for a full fine-tune
    ("peft", "lora"): (16, 32, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("peft", "none"): None,
    ("peft", "qlora"): (16, 32, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    # (Lightning's precision, the dtype the weights load in)
    ("precision", "16_mixed"): ("16-mixed", torch.float32),
    ("precision", "32_true"): ("32-true", torch.float32),
    ("precision", "bf16_mixed"): ("bf16-mixed", torch.float32),
    ("precision", "bf16_true"): ("bf16-true", torch.bfloat16),
    ("precision", "fp8"): ("bf16-true", torch.bfloat16),  # and float8 matmuls (tests/test_fp8.py)
    # (class, accelerator, devices, the strategy's own settings)
    ("strategy", "auto"): (str, "auto", "auto", {}),
    ("strategy", "ddp"): (SameStreamDDPStrategy, "auto", "auto", {"_ddp_kwargs": {"find_unused_parameters": False}}),
    ("strategy", "fsdp"): (FSDP2Strategy, "auto", "auto", {"sharding_strategy": "FULL_SHARD", "_state_dict_type": "sharded"}),
    ("strategy", "fsdp1"): (FSDPStrategy, "gpu", "auto", {"sharding_strategy": "FULL_SHARD", "_state_dict_type": "sharded"}),
    ("strategy", "fsdp8"): (FSDP2Strategy, "gpu", 8, {"sharding_strategy": "FULL_SHARD", "_state_dict_type": "sharded"}),
    ("strategy", "deepspeed_zero3"): ("DeepSpeedStrategy", "gpu", "auto", {"stage": 3}),
    ("sweep", "lora_search"): {"pruner": "NearestTrialBoundPruner", "sampler": "TPESampler",
                               "params": ["optim.lr", "peft.r", "optim.warmup_ratio"], "lora_scaling": 1.0},
    ("trainer", "default"): {"max_steps": 600, "val_check_interval": 100, "gradient_clip_val": 1.0,
                             "accumulate_grad_batches": 1, "log_every_n_steps": 10, "num_sanity_val_steps": 0},
}


def companions(group: str, option: str, tmp_path) -> list[str]:
    """What an option needs beside it to make a run: a file, a path, the module or the data it goes with."""
    rows = tmp_path / "rows.jsonl"
    if (group, option) == ("data", "jsonl"):
        rows.write_text('{"instruction": "echo", "input": "a", "output": "a"}\n')
        return [f"data.path={rows}"]
    if (group, option) == ("data", "mix"):
        rows.write_text('{"instruction": "echo", "input": "a", "output": "a"}\n')
        (tmp_path / "more.jsonl").write_text('{"instruction": "echo", "input": "b", "output": "b"}\n')
        return [f"data.sources=[{{name: reverse, path: '{rows}', weight: 3}}, "
                f"{{name: upper, path: '{tmp_path / 'more.jsonl'}', weight: 1}}]"]
    if (group, option) == ("data", "pairs"):
        rows.write_text('{"prompt": "echo a", "chosen": "a", "rejected": "b"}\n')
        return [f"data.path={rows}", "module=dpo"]
    if (group, option) == ("data", "tiny_pairs"):
        return ["module=dpo"]
    if (group, option) == ("module", "dpo"):
        return ["data=tiny_pairs"]
    if (group, option) in (("model", "sft_export"), ("experiment", "tiny_dpo"),
                           ("experiment", "tiny_grpo")):  # a run's export: the embedded model
        export, tokenizer, default = tmp_path / "export", build_char_tokenizer(), compose_config([], tmp_path, tmp_path)
        build_model(default.model, default.precision, tokenizer).save_pretrained(export)
        tokenizer.save_pretrained(export)
        return [f"model.name_or_path={export}"]
    return []


def refusal(group: str, option: str) -> str | None:
    """The one error line validation gives for an option this machine cannot run; None where it runs here."""
    gpus = gpu_count()
    if (group, option) == ("peft", "qlora"):  # over the embedded random-init default (tests/test_qlora.py: a saved one)
        return ("peft=qlora quantizes the base model as its weights load: it needs model.init=pretrained "
                "(model.name_or_path a hub id or a local save_pretrained directory)")
    if (group, option) == ("strategy", "deepspeed_zero3") and not DEEPSPEED:
        return "strategy deepspeed_zero3 needs the deepspeed package: pip install 'tunelab[deepspeed]'"
    wanted = {("strategy", "fsdp1"): 1, ("strategy", "fsdp8"): 8, ("strategy", "deepspeed_zero3"): 1}.get((group, option), 0)
    if wanted > gpus:
        return f"strategy {option} needs {wanted} GPUs, found {gpus}"
    if (group, option) == ("precision", "16_mixed") and gpus == 0:
        return "precision 16_mixed needs a GPU (fp16 autocast); on CPU use precision=bf16_mixed or 32_true"
    if (group, option) == ("precision", "fp8") and gpus == 0:
        return ("precision=fp8 needs an NVIDIA GPU with float8 matmuls (compute capability 8.9+: H100, H200, L4); this "
                "run is on the CPU: use precision=bf16_true, or precision.float8.emulate=true to check float8 numerics slowly")
    return None


def test_every_group_has_options_and_every_option_a_case():
    assert {"model", "data", "peft", "optim", "strategy", "precision", "kernels", "module", "callbacks", "logger",
            "trainer", "sweep", "experiment"} <= set(GROUPS)
    # An option added under conf/ with nothing here to say what it builds fails, as does a case left for a removed one.
    assert sorted(EXPECTED) == OPTIONS
    assert set(BUILDS) == set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_builds(group, option, tmp_path, dataset_cache, monkeypatch):
    assert (group, option) in EXPECTED, f"conf/{group}/{option}.yaml has no case in EXPECTED: say what it builds"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if group == "eval":
        monkeypatch.setenv("TUNELAB_EVAL_AUTO", "embedded")  # eval=auto as a run outside the tests gets it
    overrides = [f"{group}={option}", *companions(group, option, tmp_path)]
    cfg = compose_config(overrides, tmp_path, dataset_cache)
    if (line := refusal(group, option)) is not None:
        result = run_train(overrides, tmp_path / "run", dataset_cache, check=False)
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == f"tunelab: error: {line}", result.stderr[-2000:]
    elif group != "experiment" and (group != "model" or option in ("tiny", "sft_export")):
        validate_config(cfg)  # hub models validate alike but would load their tokenizer from the hub
    BUILDS[group](cfg, EXPECTED[group, option], build_char_tokenizer())


def tiny_model(cfg: DictConfig, tokenizer):
    return build_model(cfg.model, cfg.precision, tokenizer)


def on_cpu(cfg: DictConfig) -> DictConfig:
    """The config with the Trainer on the CPU, so building it does not depend on the GPUs this machine has."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.accelerator = "cpu"
    return cfg


def builds_model(cfg, expected, tokenizer):
    architecture, parameters = expected
    if parameters is not None:  # a hub option: its architecture block on the meta device, nothing downloaded
        cfg.model.init = "random"
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.precision, tokenizer)
        assert count_parameters(model)[1] == parameters
    else:
        model = build_model(cfg.model, cfg.precision, tokenizer)
    assert type(model).__name__ == architecture
    # The option's architecture block, or for a saved model (a run's export) the one it was saved with.
    architecture_block = cfg.model.config or compose_config([], cfg.paths.output_dir, cfg.paths.cache_dir).model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(model.config, key) == architecture_block[key], key


def builds_data(cfg, expected, tokenizer):
    kind, values = expected
    datamodule = build_datamodule(cfg.data, tokenizer)
    assert type(datamodule) is kind
    built = {key: getattr(datamodule, key) for key in values}
    if "sources" in built:  # a mix: each source's name, kind and weight
        built["sources"] = [(source.name, source.source, source.weight) for source in built["sources"]]
    assert built == values


def builds_experiment(cfg, expected, tokenizer):
    assert {group: cfg.hydra.runtime.choices[group] for group in expected["choices"]} == expected["choices"]
    if "builds" in expected:
        return builds_recipe_over_an_export(cfg, expected, tokenizer)
    cfg.model.init = "random"
    with torch.device("meta"):
        model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM" and model.peft_config["default"].r == 16
    assert {p.dtype for p in model.get_base_model().parameters() if not p.requires_grad} == {torch.bfloat16}
    assert type(build_datamodule(cfg.data, tokenizer)) is InstructionDataModule and cfg.data.path == "tatsu-lab/alpaca"
    optimizer = build_optimizer(model, cfg.optim)
    assert {group["lr"] for group in optimizer.param_groups} == {expected["lr"]}
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    assert [scheduler.lr_lambdas[0](step) for step in (0, expected["warmup_steps"])] == pytest.approx(
        [1 / (expected["warmup_steps"] + 1), 1.0])
    trainer = build_trainer(on_cpu(cfg), [], None)
    assert (trainer.max_steps, trainer.val_check_interval, trainer.accumulate_grad_batches, trainer.precision) == (
        expected["max_steps"], expected["val_check_interval"], expected["accumulate_grad_batches"], "bf16-true")
    assert build_logger(cfg)._experiment_name == expected["experiment_name"]


def builds_recipe_over_an_export(cfg, expected, tokenizer):
    """A second-stage recipe (DPO after SFT): its module and data over the export it names, with its own values."""
    module_kind, data_kind = expected["builds"]
    validate_config(cfg)
    model = build_model(cfg.model, cfg.precision, tokenizer)
    module = build_module(cfg.module, model, cfg.optim)
    assert type(module) is module_kind and type(build_datamodule(cfg.data, tokenizer)) is data_kind
    assert {group["lr"] for group in build_optimizer(model, cfg.optim).param_groups} == {expected["lr"]}
    trainer = build_trainer(on_cpu(cfg), [], None)
    assert (trainer.max_steps, trainer.val_check_interval) == (expected["max_steps"], expected["val_check_interval"])
    assert build_logger(cfg)._experiment_name == expected["experiment_name"]


def builds_eval(cfg, expected, tokenizer):
    from tunelab.evaluation.callback import BenchmarkEvaluation, build_evaluation
    from tunelab.evaluation.harness import task_manager
    from tunelab.evaluation.local_tasks import local_task_configs

    if expected is None:
        assert build_evaluation(cfg, tokenizer) == []
        return
    tasks, limit, batch_size, base = expected
    if not set(tasks) <= set(local_task_configs()):
        # lm_eval's own tasks: the builder's task index knows them; their data would be downloaded, so the test stops
        # there (tests/test_eval.py: offline, such a task ends the run in one line).
        assert (list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size, cfg.eval.base) == expected
        assert set(tasks) <= set(task_manager(tasks, cfg.paths.cache_dir).all_tasks)
        return
    [evaluation] = build_evaluation(cfg, tokenizer)
    assert type(evaluation) is BenchmarkEvaluation
    assert (evaluation.tasks, evaluation.limit, evaluation.batch_size, evaluation.base) == (tasks, limit, batch_size, base)
    assert evaluation.base_key and evaluation.tokenizer is tokenizer


def builds_kernels(cfg, expected, tokenizer):
    on_cpu_choice, on_gpu_choice = expected
    assert resolve_kernels(on_cpu(cfg)) == on_cpu_choice
    on_gpu = copy.deepcopy(cfg)
    on_gpu.trainer.accelerator = "gpu"
    assert resolve_kernels(on_gpu) == on_gpu_choice
    model = tiny_model(cfg, tokenizer)
    choice = {**on_gpu_choice, "loss": "chunked" if on_gpu_choice["loss"] != "plain" else "plain"}  # liger needs CUDA
    apply_kernels(model, choice, cfg.kernels.compile_mode)
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(layers) == cfg.model.config.num_hidden_layers and norms
    assert all((layer._compiled_call_impl is not None) == (choice["compile"] == "layers") for layer in layers)
    assert all((getattr(norm.forward, "__func__", None) is lean_rms_norm_forward) == (choice["fused_ops"] == "native")
               for norm in norms)
    loss = build_loss(choice, model, cfg.kernels.loss_chunk_size)
    assert loss is model_loss if choice["loss"] == "plain" else isinstance(loss, FusedLinearLoss)


def builds_logger(cfg, expected, tokenizer):
    logger = build_logger(cfg)
    if expected is None:
        assert logger is None
        return
    assert type(logger) is expected
    if expected is MLFlowLogger:
        assert (logger._experiment_name, logger._tracking_uri) == ("tunelab", f"sqlite:///{cfg.paths.output_dir}/mlflow.db")
    else:
        assert (logger.save_dir, logger.name) == (cfg.paths.output_dir, "csv")


def builds_module(cfg, expected, tokenizer):
    kind, settings = expected
    model = tiny_model(cfg, tokenizer)
    module = build_module(cfg.module, model, cfg.optim)
    assert type(module) is kind and module.model is model and module.optim_cfg == cfg.optim
    assert {key: getattr(module, key) for key in settings} == settings


def builds_optim(cfg, expected, tokenizer):
    optimizer = build_optimizer(tiny_model(cfg, tokenizer), cfg.optim)
    assert type(optimizer) is torch.optim.AdamW
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == expected["weight_decay"]
    assert all((g["lr"], g["betas"], g["eps"]) == (expected["lr"], expected["betas"], expected["eps"])
               for g in optimizer.param_groups)
    multiplier = build_scheduler(optimizer, cfg.optim, total_steps=100).lr_lambdas[0]
    assert {step: multiplier(step) for step in expected["multipliers"]} == pytest.approx(expected["multipliers"])


def builds_peft(cfg, expected, tokenizer):
    model = apply_peft(tiny_model(cfg, tokenizer), cfg.peft)
    trainable, total = count_parameters(model)
    if expected is None:
        assert trainable == total and not hasattr(model, "peft_config")
        return
    rank, alpha, targets = expected
    adapter = model.peft_config["default"]
    assert (adapter.r, adapter.lora_alpha, set(adapter.target_modules)) == (rank, alpha, targets)
    assert 0 < trainable < total / 10
    quantization = base_quantization(cfg.peft)  # what the base loads with (tests/test_qlora.py loads one)
    if "quantize_base" in cfg.peft:
        assert (quantization.load_in_4bit, quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant,
                quantization.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    else:
        assert quantization is None


def builds_precision(cfg, expected, tokenizer):
    value, dtype = expected
    assert {p.dtype for p in tiny_model(cfg, tokenizer).parameters()} == {dtype}
    if value == "16-mixed" and gpu_count() == 0:
        # Lightning itself would swap it for bf16-mixed on the CPU (which is why validation refuses it there).
        with pytest.warns(UserWarning, match="precision='16-mixed'"):
            build_trainer(on_cpu(cfg), [], None)
        return
    trainer_cfg = on_cpu(cfg)
    if value == "16-mixed":
        trainer_cfg.trainer.accelerator, trainer_cfg.trainer.devices = "gpu", 1
    assert build_trainer(trainer_cfg, [], None).precision == value


def builds_strategy(cfg, expected, tokenizer):
    kind, accelerator, devices, settings = expected
    assert (strategy_accelerator(cfg.strategy, cfg.trainer), strategy_devices(cfg.strategy, cfg.trainer)) == (accelerator, devices)
    model = tiny_model(cfg, tokenizer)
    if kind == "DeepSpeedStrategy":
        if not DEEPSPEED:  # Lightning's class is there; building it names the package it needs
            with pytest.raises(Exception, match="DeepSpeed"):
                build_strategy(cfg.strategy, model)
            return
        strategy = build_strategy(cfg.strategy, model)
        assert type(strategy).__name__ == kind and strategy.config["zero_optimization"]["stage"] == settings["stage"]
        return
    strategy = build_strategy(cfg.strategy, model)
    if kind is str:
        assert strategy == "auto"
        return
    assert type(strategy) is kind
    for key, value in settings.items():
        actual = getattr(strategy, key)
        assert (actual.name if hasattr(actual, "name") else actual) == value, key
    if kind is FSDPStrategy:  # one unit per decoder layer, parameters kept on the GPU, no activation checkpointing
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
        assert not strategy.cpu_offload.offload_params and not strategy._activation_checkpointing_kwargs
    if kind is FSDP2Strategy:  # the same plan (tests/test_fsdp2.py shards by it), in the model's own dtype
        assert strategy.auto_wrap == "decoder_layers" and not strategy.cpu_offload and not strategy.activation_checkpointing
        assert strategy.mixed_precision.param_dtype is None


def builds_sweep(cfg, expected, tokenizer):
    from hydra.utils import instantiate
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    from tunelab.sweep.pruning import job_arguments
    from tunelab.sweep.sweeper import StudySweeper

    sweeper = instantiate(cfg.hydra.sweeper, _recursive_=False, _execution_whitelist_=["tunelab.sweep.sweeper.*"])
    assert type(sweeper) is StudySweeper
    pruner = instantiate(sweeper.pruner, **job_arguments(sweeper.pruner, cfg.trainer.max_steps),
                         _execution_whitelist_=["tunelab.sweep.pruning.*"])
    sampler = instantiate(sweeper.sampler, seed=0, _execution_whitelist_=["optuna.samplers.*"])
    space, _, _ = create_params_from_overrides([f"{key}={value}" for key, value in sweeper.params.items()])
    assert (type(pruner).__name__, type(sampler).__name__, list(space)) == (
        expected["pruner"], expected["sampler"], expected["params"])
    model = apply_peft(tiny_model(cfg, tokenizer), cfg.peft)  # lora_alpha follows the rank: adapter scale 1
    assert {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")} == {expected["lora_scaling"]}


def builds_trainer(cfg, expected, tokenizer):
    trainer = build_trainer(on_cpu(cfg), [], None)
    assert {key: getattr(trainer, key) for key in expected} == expected


def builds_callbacks(cfg, expected, tokenizer):
    assert [type(callback).__name__ for callback in build_callbacks(cfg.callbacks)] == expected


# The check of each group: the module that builds it, given the option's config.
BUILDS = {"callbacks": builds_callbacks, "data": builds_data, "eval": builds_eval, "experiment": builds_experiment,
          "kernels": builds_kernels, "logger": builds_logger, "model": builds_model, "module": builds_module,
          "optim": builds_optim, "peft": builds_peft, "precision": builds_precision, "strategy": builds_strategy,
          "sweep": builds_sweep, "trainer": builds_trainer}


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
    saved_state, loaded_state = saved.state_dict(), loaded.state_dict()
    assert len(saved_state) > 10 and list(loaded_state) == list(saved_state)
    assert all(torch.equal(loaded_state[key], value) for key, value in saved_state.items())

    result = run_train([*FAST, "model=llama1b", f"model.name_or_path={local}", "trainer.max_steps=10"],
                       tmp_path / "run", dataset_cache)
    assert "tunelab run summary" in result.stdout
