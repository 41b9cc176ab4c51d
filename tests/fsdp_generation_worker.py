"""One rank of a 2-process CPU (gloo) FSDP job that generates the way the samples callback does under FSDP: every rank
generates the same prompts inside tunelab.samples.generation_context, with synced_gpus. Lightning's FSDP refuses CPU,
so the model is wrapped by FSDP directly, as in fsdp_export_worker.py. Writes rank<N>.json: the answers of the unwrapped
model and of the sharded one, for a full model and a LoRA one. Usage (from tests/test_generation.py):
torchrun --nproc_per_node=2 tests/fsdp_generation_worker.py OUT_DIR"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

from conftest import compose_config
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.generation import greedy_answer
from tunelab.model import build_model
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.peft import apply_peft
from tunelab.samples import generation_context
from tunelab.strategy import build_strategy

out = Path(sys.argv[1])
dist.init_process_group("gloo")
tokenizer = build_char_tokenizer()
prompts = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
           for text in ("reverse abc=", "upper xyz=")]


def answers(language_model, synced: bool) -> list[list[int]]:
    return [greedy_answer(language_model, prompt, tokenizer.eos_token_id, tokenizer.pad_token_id, 12,
                          torch.device("cpu"), synced_gpus=synced) for prompt in prompts]


results = {}
for peft_option in ("none", "lora"):  # one FSDP unit per decoder layer; with LoRA, flat parameters and adapter units
    cfg = compose_config([f"peft={peft_option}", "strategy=fsdp1"], out, out / "cache")
    torch.manual_seed(0)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft).eval()
    with torch.no_grad():  # an adapter that changes the answers (LoRA's B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    unwrapped = answers(model, synced=False)
    strategy = build_strategy(cfg.strategy, model)
    wrapped = FullyShardedDataParallel(CausalLMModule(model, cfg.optim, adapter_only_checkpoints=bool(cfg.peft)),
                                       device_id=torch.device("cpu"), **strategy.kwargs).eval()
    with generation_context(wrapped):
        results[peft_option] = {"unwrapped": unwrapped, "sharded": answers(wrapped.module.model, synced=True)}
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
dist.destroy_process_group()
