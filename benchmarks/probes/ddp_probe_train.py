"""train.py with a per-rank probe, to find where a multi-GPU run first turns non-finite (issue 12, part 1).

Each rank appends one JSON line per training step to $PROBE_DIR/rank<R>.jsonl: its own loss, the norm and finiteness
of its own gradient buckets before DDP's all-reduce (through a comm hook) and of the reduced gradients after it, a
checksum of the trainable weights (equal on every rank unless the replicas drift apart), and with PROBE_ACTIVATIONS=1
the largest |activation| out of each decoder layer. PROBE_DUMP_STEP=N saves each rank's batch, trainable weights and
RNG states as that step starts (rank<R>_step<N>.pt), to replay one rank's step on one GPU
(benchmarks/probes/replay_rank_step.py). For anomaly mode pass
`+trainer.detect_anomaly=true`: Lightning runs fit inside set_detect_anomaly(trainer.detect_anomaly), which turns
off a mode switched on outside it (as this script once did, finding nothing). Host syncs every step: a diagnostic,
not a benchmark.

    python benchmarks/probes/ddp_probe_train.py <train.py overrides>
"""

import json
import os
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tunelab.callbacks  # noqa: E402


def local_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.float()))


class RankProbe(pl.Callback):
    def __init__(self, directory: Path):
        self.directory = directory
        self.record: dict = {}
        self.activations: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"rank{trainer.global_rank}.jsonl"
        self.path.write_text("")
        wrapped = trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, self.bucket_hook)
        if os.environ.get("PROBE_ACTIVATIONS") == "1":
            for name, module in pl_module.named_modules():
                if re.search(r"\.layers\.\d+$", name):
                    module.register_forward_hook(self.activation_hook(name.split(".layers.")[1]))

    def activation_hook(self, layer: str):
        def hook(module, inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if module.training:
                self.activations[layer] = float(hidden.detach().abs().amax())
        return hook

    def bucket_hook(self, state, bucket):
        buffer = bucket.buffer()
        self.record.setdefault("buckets", []).append(
            {"norm": local_norm(buffer), "finite": bool(torch.isfinite(buffer).all()), "numel": buffer.numel()})
        work = dist.all_reduce(buffer.div_(dist.get_world_size()), async_op=True)
        return work.get_future().then(lambda future: future.value()[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if str(trainer.global_step) == os.environ.get("PROBE_DUMP_STEP"):
            trainable = {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
            frozen = sum(float(p.detach().float().sum()) for p in pl_module.parameters() if not p.requires_grad)
            torch.save({"batch": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
                        "trainable": trainable, "frozen_sum": frozen, "step": trainer.global_step,
                        "cpu_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                       self.directory / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        self.record["grad_norm"] = local_norm(torch.stack([g.float().norm() for g in grads.values()])) if grads else 0.0
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        self.record["nonfinite_grads"] = bad[:8]
        self.record["nonfinite_grad_count"] = len(bad)
        self.record["max_abs_grad"] = max(float(g.abs().max()) for g in grads.values()) if grads else 0.0
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        self.record["weights_sum"] = float(sum(p.detach().float().sum() for p in trainable))
        self.record["weights_max"] = float(max(p.detach().abs().max() for p in trainable))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record.update(step=trainer.global_step, rank=trainer.global_rank, loss=float(loss.detach()),
                           input_checksum=int(batch["input_ids"].sum()),
                           lr=trainer.optimizers[0].param_groups[0]["lr"])
        if self.activations:
            self.record["activation_max"] = dict(self.activations)
        with self.path.open("a") as file:
            file.write(json.dumps(self.record) + "\n")
        self.record, self.activations = {}, {}


configured = tunelab.callbacks.build_callbacks
probe = RankProbe(Path(os.environ.get("PROBE_DIR", "probe")))
tunelab.callbacks.build_callbacks = lambda cfg: [*configured(cfg), probe]

if __name__ == "__main__":
    # As tests/failing_rank_train.py: Lightning re-executes this script (sys.argv[0]) for the other ranks.
    entry = ROOT / "train.py"
    exec(compile(entry.read_text(), str(entry), "exec"), {"__name__": "__main__", "__file__": str(entry)})
