"""One rank of an FSDP2 start (run under torchrun on CPU ranks): builds the model where tunelab builds it (rank 0's CPU,
the meta device elsewhere), shards it and fills every rank's shards from rank 0, and writes this rank's host-memory
figures to <out>/rank<N>.json. Used by tests/test_fsdp2_memory.py and, on a llama8b-wide config, for BENCHMARKS.md.

Usage: torchrun --nproc_per_node=2 tests/fsdp2_memory_worker.py <out dir> <model option> [<config overrides> ...]
"""

import json
import resource
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

from conftest import compose_config
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.fsdp2 import shard_from_rank0
from tunelab.model import build_model
from tunelab.strategy import build_device


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(out: Path, option: str, overrides: list[str]) -> None:
    cfg = compose_config(["strategy=fsdp", "trainer.accelerator=cpu", f"model={option}", "model.init=random",
                          "model.tokenizer=char", "precision=bf16_true", *overrides], out, out / "cache")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    before = resident_bytes()
    model = build_model(cfg.model, cfg.precision, build_char_tokenizer(), device=build_device(cfg.strategy, False))
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_from_rank0(model, init_device_mesh("cpu", (world,), mesh_dim_names=("shard",)), "cpu",
                     reshard_after_forward=True, mp_policy=MixedPrecisionPolicy(), offload_policy=OffloadPolicy())
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "model_bytes": whole, "shard_bytes": held,
        "resident_before_bytes": before, "peak_resident_bytes": peak, "peak_growth_bytes": peak - before}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
