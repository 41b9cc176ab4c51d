"""Builds the `model` group: a transformers causal LM and its tokenizer."""

import contextlib
import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config.model import chat_template_text

log = logging.getLogger(__name__)


def build_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    if cfg.tokenizer == "char":
        return with_chat_template(build_char_tokenizer(), cfg)
    source = cfg.tokenizer or cfg.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        # Llama ships no pad token. Padding positions get label -100 from the collator, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return with_chat_template(tokenizer, cfg)


def with_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: DictConfig) -> PreTrainedTokenizerBase:
    """model.chat_template in place of the tokenizer's own; save_pretrained writes it into the export with it."""
    if cfg.get("chat_template") is not None:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    return tokenizer


def model_dtype(cfg: DictConfig, precision_cfg: DictConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype or precision_cfg.model_dtype)


def quantized_device_map() -> dict[str, int | str]:
    """bitsandbytes quantizes weights on the device they load to, so they load straight onto this process's GPU
    (LOCAL_RANK, as torchrun and Lightning's launcher set it), or the CPU where there is none."""
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}


def build_model(cfg: DictConfig, precision_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase,
                quantization: BitsAndBytesConfig | None = None, packed: bool = False,
                device: torch.device | None = None) -> PreTrainedModel:
    """`packed`: the training batches are packed rows (data.packing), so attention must keep their examples apart.
    `device`: where a randomly initialised model is built (tunelab.strategy.build_device); None: the current default
    device (the CPU, or whatever `with torch.device(...)` the caller is in). The meta device builds any model,
    pretrained too, as its architecture alone: an FSDP2 rank whose shards rank 0's weights fill."""
    dtype = model_dtype(cfg, precision_cfg)
    attention = cfg.attn_implementation
    if packed or attention == "sdpa":
        from tunelab.packing import TRAINING_ATTENTION

        attention = TRAINING_ATTENTION
    if cfg.init == "pretrained" and not (device is not None and torch.device(device).type == "meta"):
        placement = {"quantization_config": quantization, "device_map": quantized_device_map()} if quantization else {}
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=cfg.trust_remote_code,
            **placement,
        )
        if quantization:
            log.info("base model loaded %s-quantized (bitsandbytes), %.2f GiB of weights",
                     quantization.bnb_4bit_quant_type if quantization.load_in_4bit else "int8",
                     model.get_memory_footprint() / 2**30)
    else:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(
                architecture_config(cfg, tokenizer),
                dtype=dtype,
                attn_implementation=attention,
                trust_remote_code=cfg.trust_remote_code,
            )
    if cfg.get("zero_embeddings", "fill") == "fill":
        fill_zero_embeddings(model, tokenizer)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


@torch.no_grad()
def fill_zero_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Gives the tokenizer's tokens whose input embedding is zero (below what RMSNorm's epsilon can see) a row drawn
    like the others: their mean plus noise of their per-dimension spread, from a fixed seed, so every load of the
    same model fills the same rows. Returns the token ids filled.

    A zero row is a trap for training: a sequence that starts with such a token (a padding row of a randomly
    initialised model, which transformers zeroes; an untrained special token of a released checkpoint) keeps an
    all-zero hidden state through every layer, where RMSNorm's backward multiplies the gradient by 1/sqrt(eps) —
    about 300 — layer after layer. Its loss stays finite while the gradient overflows to inf and NaN (issue 12:
    step 11 of a 4-GPU LoRA run, whose rank 3 drew a row starting with <pad>)."""
    weight = model.get_input_embeddings().weight
    if weight.is_meta or weight.dim() != 2:
        return []
    rows = weight[: min(len(tokenizer), weight.size(0))]
    eps = getattr(model.config, "rms_norm_eps", None) or getattr(model.config, "layer_norm_eps", None) or 1e-6
    # In slices: a float32 copy of a 128k-token, 4096-wide embedding at once would be 2 GiB more at load time.
    rms = torch.cat([part.float().pow(2).mean(dim=1).sqrt() for part in rows.split(8192)])
    zero = rms < 1e-2 * eps ** 0.5
    if not zero.any() or zero.all():
        return []
    trained = rows[~zero].float()
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(int(zero.sum()), rows.size(1), generator=generator).to(rows.device)
    filled = zero.nonzero().flatten()
    weight[filled] = (trained.mean(dim=0) + noise * trained.std(dim=0)).to(weight.dtype)
    ids = filled.tolist()
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ids[:5])
    log.warning("model: %d token embedding%s all zero: %s%s; filled with the mean of the others plus noise, since a "
                "sequence starting with one would overflow the gradient (model.zero_embeddings=keep leaves them)",
                len(ids), " was" if len(ids) == 1 else "s were", names, " ..." if len(ids) > 5 else "")
    return ids


def architecture_config(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase):
    """The transformers config of a randomly initialised model: the `config` block, or the hub's config.json."""
    if cfg.config is not None:
        fields = OmegaConf.to_container(cfg.config, resolve=True)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(tokenizer))
        fields.setdefault("bos_token_id", tokenizer.bos_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        return AutoConfig.for_model(model_type, **fields)
    return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes 4-bit weight packs two into each stored byte."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total
