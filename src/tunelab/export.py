"""What a finished run leaves in `<run dir>/export`, and how `generate.py` loads it back.

An export is a directory transformers (or PEFT) loads: the fine-tuned model; or its LoRA adapter, with the base model
beside it in `base/` where the base exists nowhere else (a randomly initialised one); or, with `export.merge=true`,
the adapter merged into a bfloat16 base, a plain transformers model. With it go the tokenizer, a generation config
whose end-of-sequence token is the one training ended each answer with, and `tunelab.json`: the prompt format the run
trained with, which generate.py writes its prompts in.

torch, transformers and PEFT are imported inside the functions that use them: generate.py finds out that a path holds
no export before it loads any of them.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SETTINGS_FILE = "tunelab.json"
BASE_DIR = "base"


class ExportNotFound(ValueError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    enabled: bool
    merge: bool = False


def export_options(node: DictConfig | bool) -> ExportOptions:
    """The `export` node ({enabled, merge}), or a bare true/false (`export=false` on the command line) for enabled."""
    if isinstance(node, bool):
        return ExportOptions(enabled=node)
    return ExportOptions(enabled=node.enabled, merge=node.merge)


@dataclass(frozen=True)
class PromptFormat:
    """How a run turned a row into the text the model is conditioned on, as tunelab.data renders a training row:
    `alpaca` fills a template (the one without `{input}` when there is no input) after the BOS token, `chat` is the
    chat template the run used (saved with the tokenizer: model.chat_template, or the tokenizer's own) up to the
    assistant's turn, None tokenizes the prompt as it is given."""

    format: str | None = None
    prompt_template: str = "{instruction}"
    prompt_template_no_input: str = "{instruction}"

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, instruction: str, input: str = "") -> list[int]:
        if self.format == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                                 tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.format == "alpaca":
            template = self.prompt_template if input else self.prompt_template_no_input
            ids = tokenizer(template.format(instruction=instruction, input=input), add_special_tokens=False)["input_ids"]
            return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]
        return tokenizer(instruction)["input_ids"]

    def stop_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Where an answer ends: the EOS, and for chat the end-of-turn token the chat template writes after one."""
        if self.format == "chat":
            from tunelab.data.chat import end_of_turn_ids

            return end_of_turn_ids(tokenizer)
        return [tokenizer.eos_token_id]


# ── writing it (rank 0, at the end of a run) ──────────────────────────────────────────────────────────────────────


def export_run(cfg: DictConfig, trainer, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
               weights: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Writes the export of a finished fit as `cfg.export` asks; `weights`: the model's own, gathered from its FSDP
    shards (tunelab.checkpoint.gather_fsdp_weights), where it is sharded."""
    from peft import PeftModel

    options = export_options(cfg.export)
    if not options.enabled:
        return None
    if trainer.world_size > 1 and type(trainer.strategy).__name__ == "DeepSpeedStrategy":
        # Rank 0 alone holds only its ZeRO-3 partition (accelerate PR #4206 is the same bug for FSDP).
        print("export skipped: DeepSpeed partitions the model over ranks; convert its checkpoint with "
              "deepspeed's zero_to_fp32.py", flush=True)
        return None
    base = None
    if isinstance(model, PeftModel) and options.merge:
        merged_model(model, weights, cfg.model).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    else:
        export_pretrained(model, tokenizer, directory, weights)
        if isinstance(model, PeftModel) and cfg.model.init == "random":  # the base was never saved: save it here
            base = BASE_DIR
            cpu_copy(model, weights).unload().save_pretrained(directory / base)
    prompt = prompt_format(trainer.datamodule)
    write_generation_config(directory, model, tokenizer, prompt.stop_ids(tokenizer))
    settings = {"prompt": asdict(prompt), "base_model": base,
                "trust_remote_code": cfg.model.trust_remote_code,
                "fill_zero_embeddings": cfg.model.get("zero_embeddings", "fill") == "fill"}
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    return directory


def unwrapped_copy(model):
    """The same PEFT model without FSDP's wrappers, on the meta device: it holds no weights, only module names."""
    import torch
    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"):
        copy = get_peft_model(type(base)(base.config), deepcopy(model.peft_config[model.active_adapter]))
    copy.peft_config = model.peft_config  # as configured, base_model_name_or_path included
    return copy


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                      weights: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained of the fine-tuned model, or only of its LoRA adapter, next to its tokenizer; `weights` stand in
    for the model's own where those are shards (gather_fsdp_weights)."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        if weights is not None:
            # PEFT picks the adapter's keys by walking the model's modules, whose names FSDP changed (`layers.0.
            # _fsdp_wrapped_module.self_attn...`) so that no gathered key would match: walk an unwrapped copy.
            model = unwrapped_copy(model)
        if not get_peft_model_state_dict(model, state_dict=weights):
            raise RuntimeError(f"export: no adapter weights found for {type(model.get_base_model()).__name__}; "
                               "nothing written (the checkpoints hold the trained adapter)")
    model.save_pretrained(directory, state_dict=weights)
    tokenizer.save_pretrained(directory)
    return directory


def cpu_copy(model, weights: dict[str, torch.Tensor] | None = None):
    """The PEFT model again, on the CPU, from `weights` (gathered shards) or its own: merging or unloading the copy
    leaves the trained model as it is."""
    copy = unwrapped_copy(model)
    state = weights if weights is not None else model.state_dict()
    copy.load_state_dict({key: value.detach().to("cpu", copy=True) for key, value in state.items()}, assign=True)
    copy.get_base_model().tie_weights()  # assign=True gave tied weights a parameter each
    # Buffers outside the state dict (rotary inv_freq) are still on the meta device: take the model's own.
    own = {name.replace("_fsdp_wrapped_module.", ""): buffer for name, buffer in model.named_buffers()}
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            module, _, key = name.rpartition(".")
            copy.get_submodule(module).register_buffer(key, own[name].detach().to("cpu", copy=True), persistent=False)
    return copy


def merged_model(model, weights: dict[str, torch.Tensor] | None, model_cfg: DictConfig) -> PreTrainedModel:
    """The trained adapter merged into its base (PEFT's merge_and_unload), in bfloat16, on the CPU."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        # Merged into the quantized weights, the sum would be rounded back to 4 bits: the adapter goes onto the base
        # reloaded in bfloat16 instead, the model that QLoRA's quantized base stands for.
        base = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.bfloat16,
                                                    trust_remote_code=model_cfg.trust_remote_code)
        with torch.no_grad():  # the embeddings the adapter trained with (tunelab.model.fill_zero_embeddings)
            base.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
        copy = get_peft_model(base, deepcopy(model.peft_config[model.active_adapter]))
        set_peft_model_state_dict(copy, get_peft_model_state_dict(model))
    else:
        copy = cpu_copy(model, weights)
    return copy.merge_and_unload().to(torch.bfloat16)


def write_generation_config(directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            stop_ids: list[int] | None = None) -> None:
    """The model's generation config with the special tokens training used: every answer it learned ends with the
    tokenizer's EOS, or with the end-of-turn token of its chat template (`stop_ids`), which need not be the ones the
    base model's own config names."""
    from transformers import GenerationConfig

    config = deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.eos_token_id = stop_ids if stop_ids and len(stop_ids) > 1 else tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(directory)


def prompt_format(datamodule) -> PromptFormat:
    """How tunelab's instruction data module wrote prompts (data.format=auto resolved from the rows' columns); a
    data module without prompts (random tokens) gives prompts as they are."""
    from tunelab.data import InstructionDataModule, detect_format, load_rows

    if not isinstance(datamodule, InstructionDataModule):
        return PromptFormat()
    fmt = datamodule.format
    if fmt == "auto":
        dm = datamodule
        fmt = detect_format(load_rows(dm.source, dm.path, dm.split, dm.num_examples, dm.cache_dir, dm.seed).column_names)
    return PromptFormat(fmt, *datamodule.templates)


# ── loading it back (generate.py) ─────────────────────────────────────────────────────────────────────────────────


def find_export(path: Path) -> Path:
    """The export a path names: an export directory, or a run dir with one in export/."""
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    raise ExportNotFound(f"{path}: no exported model there (give a run dir with export/ in it, or an export dir "
                         "with config.json or adapter_config.json)")


@dataclass
class Exported:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    eos_token_id: int | list[int]


def load_export(directory: Path, device: str = "cpu") -> Exported:
    """The model of an export directory (whole, merged, or base + adapter), its tokenizer, prompt format and EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    settings_file = directory / SETTINGS_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    trust = settings.get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_path = (directory / settings["base_model"] if settings.get("base_model")
                     else PeftConfig.from_pretrained(directory).base_model_name_or_path)
        if not base_path:
            raise ExportNotFound(f"{directory}: the adapter names no base model (adapter_config.json's "
                                 "base_model_name_or_path) and the export holds none in base/")
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto", trust_remote_code=trust)
        if settings.get("fill_zero_embeddings"):  # as tunelab.model.build_model did for training
            from tunelab.model import fill_zero_embeddings

            fill_zero_embeddings(base, tokenizer)
        model = PeftModel.from_pretrained(base, directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", trust_remote_code=trust)
    eos = tokenizer.eos_token_id
    if (directory / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(directory).eos_token_id or eos
    return Exported(model.to(device).eval(), tokenizer, PromptFormat(**settings.get("prompt", {})), eos)
