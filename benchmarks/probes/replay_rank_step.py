"""Replays one rank's training step, saved by benchmarks/probes/ddp_probe_train.py (PROBE_DUMP_STEP), on one GPU, to find
which op turns its gradient non-finite (issue 12, part 1).

Builds the model as train.py does for the given overrides (same seed, so the same frozen base: the dump's checksum of
it is compared), loads the dumped adapters, then runs the dumped batch forward and backward once per attention
variant, each from the dumped RNG state (LoRA dropout draws the same masks). Per variant it prints the loss, how many
adapter gradients are non-finite, and the largest |gradient| of the residual stream entering each decoder layer's
output, from the last layer back, so the first layer whose backward returns a non-finite value stands out. The first
variant runs in anomaly mode, which names the backward op.

    python benchmarks/probes/replay_rank_step.py <rank<R>_step<N>.pt>... <train.py overrides>
"""

import contextlib
import math
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only to check this script
sys.path.insert(0, str(ROOT / "src"))

import lightning.pytorch as pl  # noqa: E402

from tunelab.data import build_datamodule  # noqa: E402
from tunelab.inputs import load_tokenizer  # noqa: E402
from tunelab.model import build_model  # noqa: E402
from tunelab.kernels import model_loss  # noqa: E402
from tunelab.peft import apply_peft, base_quantization  # noqa: E402

VARIANTS = {  # name: (attention implementation, SDPA backends allowed)
    "training_attention_anomaly": ("tunelab_causal", None),
    "sdpa_flash": ("tunelab_causal", [SDPBackend.FLASH_ATTENTION]),
    "sdpa_efficient": ("tunelab_causal", [SDPBackend.EFFICIENT_ATTENTION]),
    "sdpa_cudnn": ("tunelab_causal", [SDPBackend.CUDNN_ATTENTION]),
    "sdpa_math": ("tunelab_causal", [SDPBackend.MATH]),
    "eager": ("eager", None),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """As Lightning's bf16-true precision does around the forward."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for the ${hydra:...} interpolations of the data paths
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model)
    build_datamodule(cfg.data, tokenizer)
    model = build_model(cfg.model, cfg.precision, tokenizer, base_quantization(cfg.peft), device=DEVICE)
    return apply_peft(model, cfg.peft).to(DEVICE)


def layer_gradient_recorder(model) -> tuple[dict, list]:
    """{layer index: largest |d loss / d layer output|}, filled during backward."""
    seen: dict[int, float] = {}
    handles = []
    layers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].isdigit() and ".layers." in n]
    for index, layer in enumerate(layers):
        def hook(module, grad_input, grad_output, index=index):
            grad = grad_output[0]
            if grad is not None:
                seen[index] = float(grad.detach().float().abs().nan_to_num(nan=math.inf).amax())
        handles.append(layer.register_full_backward_hook(hook))
    return seen, handles


def replay(model, dump: dict, name: str, attention: str, backends) -> None:
    model.get_base_model().set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(dump["cpu_rng"])
    if DEVICE.type == "cuda":
        torch.cuda.set_rng_state(dump["cuda_rng"])
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in dump["batch"].items()}
    seen, handles = layer_gradient_recorder(model)
    anomaly = name.endswith("_anomaly")
    try:
        with (sdpa_kernel(backends) if backends else contextlib.nullcontext()), default_dtype(torch.bfloat16), \
                torch.autograd.set_detect_anomaly(anomaly, check_nan=True):
            loss = model_loss(model, batch)
            loss.backward()
        error = ""
    except RuntimeError as failure:
        loss, error = torch.tensor(math.nan), str(failure).splitlines()[0][:300]
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    bad = sorted(n for n, g in grads.items() if not torch.isfinite(g).all())
    norms = [g.float().norm() for g in grads.values()]
    norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else math.nan
    print(f"\n== {name}: loss {float(loss):.5f}, grad norm {norm:.4g}, {len(bad)}/{len(grads)} adapter grads non-finite"
          f" {error}")
    if bad:
        print("   first non-finite:", ", ".join(b.split("model.model.")[-1] for b in bad[:6]))
    print("   max |grad| into each layer's output:",
          " ".join(f"L{i}:{seen[i]:.3g}" for i in sorted(seen, reverse=True)))


def main(argv: list[str]) -> None:
    dumps = [arg for arg in argv if arg.endswith(".pt")]
    model = build([arg for arg in argv if not arg.endswith(".pt")])
    for path in dumps:
        print(f"\n######## {path}")
        replay_dump(model, torch.load(path, weights_only=False))


def replay_dump(model, dump: dict) -> None:
    frozen = sum(float(p.detach().float().sum()) for p in model.parameters() if not p.requires_grad)
    print(f"frozen checksum: replay {frozen:.6g}, dump {dump.get('frozen_sum', float('nan')):.6g}; step {dump['step']}")
    trainable = {name.removeprefix("model."): tensor for name, tensor in dump["trainable"].items()}
    model.load_state_dict(trainable, strict=False)
    assert not set(trainable) - {n for n, _ in model.named_parameters()}, "the dump's adapter names do not match"
    model.train()
    for name, (attention, backends) in VARIANTS.items():
        if DEVICE.type == "cpu" and backends and backends != [SDPBackend.MATH]:
            continue
        replay(model, dump, name, attention, backends)


if __name__ == "__main__":
    main(sys.argv[1:])
