"""Hand-written training loops that tunelab's speed is judged against (/work/shared/ANCHORS.md), so they can be
measured in the same device call as tunelab itself.

What it measures: the Llama-3.2-1B architecture (transformers.LlamaConfig, random init directly in bf16, sdpa
attention, tied embeddings), random token ids B x S with labels = inputs, fused AdamW lr 1e-5. Each step is
`loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`, timed
alone between two `torch.cuda.synchronize()` calls (the batch is made and copied before the clock starts, the loss
is read with .item() after it stops). `--warmup` steps (they include compilation) then `--steps` timed steps.
Reported: median tokens/s (B*S / median step time), mean tokens/s (all timed tokens / all timed time),
MFU = tokens/s x (6*N + 12*L*d*S) / 989e12 from the median (LoRA: 4*N, N still the total parameter count),
peak `torch.cuda.max_memory_allocated()` over the whole run, every loss, versions and the GPU.

Variants: eager | compile (whole model under torch.compile) | liger (liger-kernel rope, rms_norm, swiglu and fused
linear cross-entropy, eager) | lora_eager | lora_compile (peft LoRA r=16 on q,k,v,o; AdamW over the adapters).

Why one variant per process: `apply_liger_kernel_to_llama()` patches transformers' Llama classes for the whole
process, so every Llama built after it in that process gets liger's kernels; torch.compile's caches and the CUDA
caching allocator's peak would also carry over. So each invocation runs ONE variant and appends one JSON line:

    for v in eager compile liger lora_eager lora_compile; do
        python benchmarks/reference_loops.py $v --out /tmp/ref.jsonl
    done

The seed (torch.manual_seed(0) before the model is built) and the data (batch `i` drawn from a CPU generator seeded
1234 + i) are the same in every variant. `--tiny` swaps in a tiny config (hidden 64, 2 layers, batch 2 x 32) that
also runs on CPU, for smoke tests; on CPU the optimizer is not fused and `liger` is skipped (it needs CUDA).
"""

import argparse
import importlib.metadata
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

VARIANTS = ("eager", "compile", "liger", "lora_eager", "lora_compile")
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, as in ANCHORS.md


def llama_config(tiny: bool) -> LlamaConfig:
    dims = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256)
    if tiny:
        dims = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=256)
    return LlamaConfig(
        **dims, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=None if tiny else 128000, eos_token_id=None if tiny else 128001, attn_implementation="sdpa",
    )


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default 2048 (32 with --tiny)")
    parser.add_argument("--steps", type=int, default=25, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny model that runs on CPU (smoke test)")
    parser.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    batch = args.batch or (2 if args.tiny else 4)
    seq = args.seq or (32 if args.tiny else 2048)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.variant == "liger" and not cuda:
        print("reference_loops: skipped 'liger': liger-kernel's Triton kernels need a CUDA GPU; nothing written.",
              file=sys.stderr)
        return

    lora = args.variant.startswith("lora")
    compiled = args.variant.endswith("compile")
    if args.variant == "liger":  # must come before the model is built: it swaps transformers' Llama classes
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)

    torch.manual_seed(0)
    config = llama_config(args.tiny)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random init, in bf16, on device
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda)
    if compiled:
        model = torch.compile(model)

    step_times, losses = [], []
    for step in range(args.warmup + args.steps):
        gen = torch.Generator().manual_seed(1234 + step)
        x = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= args.warmup:
            step_times.append(elapsed)

    versions = {"torch": torch.__version__, "transformers": version("transformers")}
    if lora:
        versions["peft"] = version("peft")
    if args.variant == "liger":
        versions["liger-kernel"] = version("liger-kernel")
    tokens = batch * seq
    median_tps = tokens / statistics.median(step_times)
    flops_per_token = (4 if lora else 6) * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq
    result = {
        "variant": args.variant, "batch": batch, "seq": seq, "warmup": args.warmup, "steps": args.steps,
        "tiny": args.tiny,
        "tokens_per_s_median": round(median_tps, 1),
        "tokens_per_s_mean": round(tokens * len(step_times) / sum(step_times), 1),
        "mfu": round(median_tps * flops_per_token / PEAK_BF16_FLOPS, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "step_times_s": [round(t, 5) for t in step_times],
        "losses": losses,
        "n_params": n_params, "trainable_params": sum(p.numel() for p in trainable),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
