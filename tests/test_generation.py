"""Generation you can read, and a result you can use: each validation's greedy answers to fixed prompts (an MLflow
table, the run summary, val/generated_exact_match), the export (merged LoRA/QLoRA, base + adapter, the prompt format)
and generate.py, which answers from the export as the last validation did."""

import json
import os
import subprocess
import sys
from copy import deepcopy

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

from tests.conftest import FAST, ROOT, compose_config, run_train, save_base_with_untrained_tokens
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import ConfigError, validate_config
from tunelab.data import build_datamodule
from tunelab.export import ExportOptions, PromptFormat, export_options, export_run, load_export, merged_model
from tunelab.generation import greedy_answer
from tunelab.kernels import decoder_layers
from tunelab.model import build_model
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.peft import apply_peft, base_quantization
from tunelab.samples import METRIC, TABLE, GenerationSamples, generation_context
from tunelab.tiny_task import OPERATIONS

DEFAULT = [*FAST, "trainer.max_steps=60", "trainer.val_check_interval=30"]  # the default job, shorter


def generate(args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(extra_env or {})})


def with_strong_adapter(model):
    """LoRA's B starts at zero, so a fresh adapter changes nothing: give it weights that change the answers."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, dataset_cache):
    base = tmp_path_factory.mktemp("default")
    result = run_train(DEFAULT, base / "run", dataset_cache)
    client = mlflow.MlflowClient(f"sqlite:///{base / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    table = json.loads(open(client.download_artifacts(run.info.run_id, TABLE, str(base))).read())
    return result, client, run, table, base / "run"


def rows(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_each_validation_logs_greedy_answers_to_the_same_prompts(default_run):
    _, client, run, table, _ = default_run
    assert table["columns"] == ["prompt", "expected", "generated", "step"]
    samples = rows(table)
    assert [s["step"] for s in samples] == [0] * 4 + [30] * 4 + [60] * 4  # the base's answers first (validate_at_start)
    groups = [samples[:4], samples[4:8], samples[8:]]
    assert [s["prompt"] for s in groups[0]] == [s["prompt"] for s in groups[1]] == [s["prompt"] for s in groups[2]]
    for sample in samples:  # the prompt as the model saw it (the alpaca template), and its answer
        instruction, word = sample["prompt"].removesuffix("=").split(" ")
        assert sample["expected"] == OPERATIONS[instruction](word)
    assert {"path": TABLE, "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])  # the UI's listing
    history = sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)
    assert [m.value for m in history] == [sum(s["generated"] == s["expected"] for s in group) / 4 for group in groups]



def test_samples_of_a_template_whose_turns_end_before_the_eos_stop_at_its_end_of_turn(tmp_path, dataset_cache):
    """Gemma's chat template ends each turn with <end_of_turn> and writes its EOS nowhere in a conversation: the samples
    are the answers through that token, and generation stops there, as generate.py's does from the export."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    cfg = compose_config(["data=tiny_chat", "data.num_examples=100"], tmp_path, dataset_cache)
    samples = GenerationSamples(count=2, max_new_tokens=4)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, callbacks=[samples])
    trainer.validate(CausalLMModule(build_model(cfg.model, cfg.precision, tokenizer), cfg.optim),
                     datamodule=build_datamodule(cfg.data, tokenizer))
    assert len(samples.prompts) == 2 and all(expected[-1] == end_of_turn for _, expected in samples.prompts)
    assert end_of_turn in samples.ends and METRIC in trainer.callback_metrics

def test_summary_shows_the_last_validation_samples_and_the_export(default_run):
    result, _, _, table, run_dir = default_run
    summary = result.stdout[result.stdout.index("tunelab run summary"):].splitlines()
    assert any(line.startswith("generated (step 60)") for line in summary)
    shown = [[part.strip() for part in line.split(" → ")] for line in summary if " → " in line]
    for sample in rows(table)[-4:]:
        answer = " ".join(sample["generated"].split()) or "(nothing)"
        assert any(prompt == sample["prompt"] and said.startswith(answer) for prompt, said in shown), sample
    assert any(f'python generate.py {run_dir} "<prompt>"' in line for line in summary)


def test_generate_answers_from_the_export_as_the_last_validation_did(default_run):
    *_, table, run_dir = default_run
    sample = max(rows(table)[-4:], key=lambda s: len(s["generated"]))
    assert sample["generated"], "the model says nothing yet: the comparison would prove little"
    instruction, word = sample["prompt"].removesuffix("=").split(" ")
    result = generate([str(run_dir), instruction, "--input", word])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == sample["generated"] + "\n"


def test_lora_run_exports_the_adapter_merged_into_a_plain_bfloat16_model(tmp_path, dataset_cache):
    run_dir = tmp_path / "run"
    # One validation, at the last step: its checkpoint holds the adapter the export merged.
    run_train([*FAST, "trainer.val_check_interval=20", "peft=lora", "export.merge=true", f"objective.metric={METRIC}",
               "objective.mode=max"], run_dir, dataset_cache)
    assert json.loads((run_dir / "objective.json").read_text())["metric"] == METRIC
    export = run_dir / "export"
    assert not (export / "adapter_config.json").exists()
    merged, loading = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert type(merged) is LlamaForCausalLM and merged.dtype == torch.bfloat16
    assert not any(loading.values()), loading  # every weight there, none left over
    tokenizer = build_char_tokenizer()
    assert GenerationConfig.from_pretrained(export).eos_token_id == tokenizer.eos_token_id

    # The unmerged model: the base rebuilt from the seed (as a resume rebuilds it) with last.ckpt's trained adapter.
    cfg = compose_config(["peft=lora"], tmp_path, dataset_cache)
    pl.seed_everything(cfg.seed)
    adapted = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft).eval()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20
    adapter = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    assert not adapted.load_state_dict(adapter, strict=False).unexpected_keys
    ids = torch.tensor([PromptFormat("alpaca", "{instruction} {input}=").prompt_ids(tokenizer, "reverse", "abcdef")])
    with torch.no_grad():
        expected = adapted(ids).logits
        with adapted.disable_adapter():
            base = adapted(ids).logits
        got = merged.float()(ids).logits
        in_process = merged_model(adapted, None, cfg.model).float()(ids).logits  # the trained model is left as it was
        again = adapted(ids).logits
    assert (got - expected).abs().max() < 0.05 * (base - expected).abs().max()  # bfloat16 rounding, not the adapter
    assert (in_process - expected).abs().max() < 0.05 * (base - expected).abs().max()
    assert torch.equal(again, expected)


def test_qlora_adapter_merges_into_its_base_reloaded_in_bfloat16(tmp_path, dataset_cache):
    pytest.importorskip("bitsandbytes")
    tokenizer = build_char_tokenizer()
    plain = compose_config([], tmp_path, dataset_cache)
    build_model(plain.model, plain.precision, tokenizer).save_pretrained(tmp_path / "base")
    cfg = compose_config(["peft=qlora", "model.init=pretrained", f"model.name_or_path={tmp_path / 'base'}",
                          "model.tokenizer=char"], tmp_path, dataset_cache)
    quantized = with_strong_adapter(apply_peft(build_model(cfg.model, cfg.precision, tokenizer, base_quantization(cfg.peft)),
                                               cfg.peft))
    merged = merged_model(quantized, None, cfg.model).eval()
    projection = merged.model.layers[0].self_attn.q_proj
    assert type(projection) is torch.nn.Linear and projection.weight.dtype == torch.bfloat16  # not 4-bit again

    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
                               deepcopy(quantized.peft_config["default"])).eval()
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantized))
    ids = torch.tensor([PromptFormat("alpaca", "{instruction} {input}=").prompt_ids(tokenizer, "upper", "abc")])
    with torch.no_grad():
        expected = reference(ids).logits.float()
        with reference.disable_adapter():
            base = reference(ids).logits.float()
        got = merged(ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * (base - expected).abs().max()


def test_chat_lora_export_answers_through_the_chat_template_from_base_and_adapter(tmp_path, dataset_cache):
    """A LoRA export of a randomly initialised model holds its base too; generate.py writes the prompt through the
    tokenizer's chat template, as the validation rows were, and answers as the validation samples did."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": str(i)}]}) + "\n" for i in range(40)))
    cfg = compose_config(["peft=lora", "data=jsonl", f"data.path={data}", "data.val_size=4"], tmp_path, dataset_cache)
    tokenizer = build_char_tokenizer()
    model = with_strong_adapter(apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft))
    samples = GenerationSamples(count=2)
    trainer = pl.Trainer(logger=False, callbacks=[samples], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(CausalLMModule(model, cfg.optim, adapter_only_checkpoints=True), datamodule=build_datamodule(cfg.data, tokenizer))
    sample = samples.last[0]
    message = sample["prompt"].removeprefix("<user>").removesuffix("\n<assistant>")
    assert sample["expected"] == message.removeprefix("say ")  # through the template's end-of-turn (EOS), no newline
    assert PromptFormat("chat").prompt_ids(tokenizer, message) == samples.prompts[0][0]

    export = export_run(cfg, trainer, model, tokenizer, tmp_path / "export")
    assert (export / "adapter_config.json").is_file() and (export / "base" / "model.safetensors").is_file()
    result = generate([str(export), message])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == sample["generated"] + "\n"
    with model.disable_adapter():
        without = greedy_answer(model.eval(), samples.prompts[0][0], tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    assert tokenizer.decode(without, skip_special_tokens=True) != sample["generated"]  # the adapter was loaded


def test_an_adapter_export_over_a_base_with_zero_embeddings_loads_the_rows_it_trained_with(tmp_path, dataset_cache):
    # tunelab.model fills a base's all-zero token rows before training; generate.py loads base + adapter itself.
    tokenizer = build_char_tokenizer()
    untrained = save_base_with_untrained_tokens(tmp_path / "base", dataset_cache)
    cfg = compose_config(["peft=lora", "model.init=pretrained", f"model.name_or_path={tmp_path / 'base'}",
                          "model.tokenizer=char", "data.num_examples=40"], tmp_path, dataset_cache)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1)
    trainer.validate(CausalLMModule(model, cfg.optim), datamodule=build_datamodule(cfg.data, tokenizer))

    export = export_run(cfg, trainer, model, tokenizer, tmp_path / "export")
    loaded = load_export(export).model.get_input_embeddings().weight[untrained]
    trained = model.get_input_embeddings().weight[untrained]
    assert trained.abs().sum() > 0 and torch.equal(loaded, trained)


def test_fsdp_ranks_generate_together_what_the_unsharded_model_does(tmp_path):
    """Lightning's FSDP runs on GPUs only; tests/fsdp_generation_worker.py wraps the model with FSDP on CPU."""
    worker = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "tests/fsdp_generation_worker.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert worker.returncode == 0, worker.stderr[-4000:]
    for rank in (0, 1):
        for peft_option, answers in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            assert answers["sharded"] == answers["unwrapped"], (rank, peft_option)


def test_generating_during_a_run_compiles_nothing_more_in_compiled_layers(tmp_path, dataset_cache):
    """Each decoding shape would compile the layers anew, spending the recompile limit training's own shapes need."""
    cfg = compose_config([], tmp_path, dataset_cache)
    tokenizer = build_char_tokenizer()
    model = build_model(cfg.model, cfg.precision, tokenizer)
    for layer in decoder_layers(model):
        layer.compile(backend="eager")  # kernels.compile=layers, without inductor's compile time
    prompt = PromptFormat("alpaca", "{instruction} {input}=").prompt_ids(tokenizer, "reverse", "abc")
    model(torch.tensor([prompt]))  # compiled for training's shapes
    with torch.compiler.set_stance("fail_on_recompile"), generation_context(model):
        greedy_answer(model.eval(), prompt, tokenizer.eos_token_id, tokenizer.pad_token_id, 8)


def test_generate_names_a_path_without_an_export_in_one_line_before_loading_torch(tmp_path):
    result = generate([str(tmp_path), "hello"], extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
    own = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert result.returncode != 0 and len(own) == 1
    assert own[0].startswith(f"tunelab: error: {tmp_path}: no exported model there")
    assert not {"torch", "transformers", "peft", "lightning"} & imported


def test_objective_may_be_the_generated_exact_match_while_the_samples_run(tmp_path, dataset_cache):
    validate_config(compose_config([f"objective.metric={METRIC}", "objective.mode=max"], tmp_path, dataset_cache))
    with pytest.raises(ConfigError, match=f"objective.metric={METRIC} is logged by the samples callback, which is off"):
        validate_config(compose_config([f"objective.metric={METRIC}", "callbacks.samples=null"], tmp_path, dataset_cache))


@pytest.mark.parametrize("override, options", [("export=false", ExportOptions(False)), ("export=true", ExportOptions(True)),
                                               ("export.merge=true", ExportOptions(True, merge=True))])
def test_export_is_a_node_or_a_bare_switch(tmp_path, dataset_cache, override, options):
    cfg = compose_config([override], tmp_path, dataset_cache)
    validate_config(cfg)
    assert export_options(cfg.export) == options


def test_export_of_another_kind_is_refused(tmp_path, dataset_cache):
    with pytest.raises(ConfigError, match="export=3 must be true or false or a mapping"):
        validate_config(compose_config(["export=3"], tmp_path, dataset_cache))
