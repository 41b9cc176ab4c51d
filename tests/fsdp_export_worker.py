"""One rank of a 2-process CPU (gloo) FSDP job that exports the model the way train.py does: gather the shards, then
save_pretrained on rank 0. Lightning's FSDP refuses CPU, so the model is wrapped by FSDP directly, with the wrap
policy and arguments tunelab's fsdp strategy would give it. Usage (from tests/test_scale_out.py):
torchrun --nproc_per_node=2 tests/fsdp_export_worker.py OUT_DIR PEFT_OPTION"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

from conftest import compose_config
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.checkpoint import gather_fsdp_weights
from tunelab.export import export_pretrained
from tunelab.model import build_model
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.peft import apply_peft
from tunelab.strategy import build_strategy

out, peft_option = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
cfg = compose_config([f"peft={peft_option}", "strategy=fsdp1"], out, out / "cache")
tokenizer = build_char_tokenizer()
torch.manual_seed(0)
model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
with torch.no_grad():  # distinct values in every trainable matrix (LoRA's B starts at zero), the same on both ranks
    trained = {name: p.normal_() for name, p in model.named_parameters() if p.requires_grad}
if dist.get_rank() == 0:
    torch.save({name: p.clone() for name, p in trained.items()}, out / "expected.pt")

strategy = build_strategy(cfg.strategy, model)
wrapped = FullyShardedDataParallel(CausalLMModule(model, cfg.optim, adapter_only_checkpoints=bool(cfg.peft)),
                                   device_id=torch.device("cpu"), **strategy.kwargs)
weights = gather_fsdp_weights(wrapped)
if dist.get_rank() == 0:
    export_pretrained(model, tokenizer, out / "export", weights)
dist.destroy_process_group()
