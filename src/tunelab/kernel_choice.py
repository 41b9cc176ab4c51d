"""Which kernels a run gets: each `auto` of the `kernels` group resolved from the config and the hardware alone.

Validation asks this before anything heavy loads, so it imports neither torch nor liger-kernel; tunelab.kernels
builds what it chose.
"""

import importlib.util

from omegaconf import DictConfig

from tunelab.strategy import runs_on_gpu

LOSSES = ("auto", "liger", "chunked", "plain")
COMPILES = ("auto", "layers", "none")
FUSED_OPS = ("auto", "liger", "native", "none")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(cfg: DictConfig) -> dict[str, str]:
    """Each `auto` of the run's kernels group replaced by what it means for this run (the whole config: hardware,
    strategy, adapters). liger's RMSNorm and SwiGLU are Triton kernels that torch.compile cannot trace into a layer's
    graph, so `auto` takes them only where layers stay eager; compiled layers were faster on one H100 (BENCHMARKS.md,
    fast path). Layers stay eager where compiling them is untested: over a 4-bit base (bitsandbytes kernels) and
    for adapters under FSDP1 (flat, non-original parameters); FSDP2 shards each compiled layer as it is."""
    kernels = cfg.kernels
    on_gpu = runs_on_gpu(cfg.strategy, cfg.trainer)
    liger = on_gpu and liger_available()
    untested = bool(cfg.peft) and (cfg.peft.get("quantize_base") is not None
                                   or str(cfg.strategy.get("_target_", "")).endswith("FSDPStrategy"))
    compile_layers = kernels.compile if kernels.compile != "auto" else "layers" if on_gpu and not untested else "none"
    if kernels.fused_ops != "auto":
        fused_ops = kernels.fused_ops
    else:
        fused_ops = "native" if compile_layers == "layers" else "liger" if liger else "none"
    loss = kernels.loss if kernels.loss != "auto" else ("liger" if liger else "chunked") if on_gpu else "plain"
    return {"loss": loss, "compile": compile_layers, "fused_ops": fused_ops}
