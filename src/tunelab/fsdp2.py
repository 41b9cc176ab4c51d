"""strategy=fsdp and fsdp8: FSDP2, PyTorch's per-parameter sharding (`torch.distributed.fsdp.fully_shard`).

Each decoder layer becomes one unit (its parameters all-gathered for its forward and backward, its gradients
reduce-scattered after), then the root takes what is left (embeddings, final norm, output projection). Parameters
are DTensors sharded on dim 0 with their own names, so frozen and trainable weights share a unit (a LoRA layer is one
unit, gradients and optimizer state exist only for its adapters), checkpoints go through `torch.distributed.checkpoint`
(sharded, and loadable on another number of ranks), and it runs on CPU processes over gloo as on GPUs over NCCL.

Built on Lightning's ModelParallelStrategy, which hands the LightningModule a device mesh in `configure_model` and
saves and loads through DCP. Its own mesh is (data parallel = nodes, tensor parallel = GPUs a node) with the data
split over nodes only; FSDP wants a mesh over every rank (or, for HSDP, replicate over nodes and shard within) and
every rank reading its own data, so this subclass builds that mesh and splits the data over all ranks.

The model is built whole only on rank 0 (tunelab.strategy.build_device gives the other ranks the meta device): each
rank shards its empty model, and rank 0's weights are broadcast shard by shard into the others (DCP's
`set_model_state_dict(broadcast_from_rank0=True)`). So no rank but rank 0 ever holds a full copy, and every world
size starts from the weights one process would have.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from tunelab.decoder_layers import decoder_layer_classes

log = logging.getLogger(__name__)

# FSDP1's sharding strategies, which users know, as FSDP2 mesh shapes and resharding.
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "HYBRID_SHARD": True,
                         "_HYBRID_SHARD_ZERO2": False, "NO_SHARD": False}
HYBRID = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


class FSDP2Strategy(ModelParallelStrategy):
    """`sharding_strategy`: FULL_SHARD (parameters resharded after each forward), SHARD_GRAD_OP (kept gathered until
    the backward), HYBRID_SHARD / _HYBRID_SHARD_ZERO2 (HSDP: shard within a node, replicate across nodes), NO_SHARD
    (replicate everywhere: DDP). `param_dtype` / `reduce_dtype`: FSDP2's mixed-precision policy (the compute copy of
    the parameters, and the gradients' reduction). `state_dict_type`: sharded (DCP, every rank its shard) or full (one
    file gathered on rank 0)."""

    def __init__(self, sharding_strategy: str = "FULL_SHARD", auto_wrap: str | None = "decoder_layers",
                 activation_checkpointing: bool = False, cpu_offload: bool = False, state_dict_type: str = "sharded",
                 param_dtype: str | None = None, reduce_dtype: str | None = None, **kwargs) -> None:
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.sharding_strategy = sharding_strategy
        self.auto_wrap = auto_wrap
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self._state_dict_type = state_dict_type  # read as FSDPStrategy's is (tunelab.checkpoint, CausalLMModule)
        self.mixed_precision = MixedPrecisionPolicy(
            param_dtype=getattr(torch, param_dtype) if param_dtype else None,
            reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None)

    def setup_environment(self) -> None:
        self._setup_distributed()
        if self.sharding_strategy in HYBRID:
            shape, names = (self.num_nodes, self.num_processes), ("replicate", "shard")
        elif self.sharding_strategy == "NO_SHARD":
            shape, names = (self.world_size, 1), ("replicate", "shard")
        else:
            shape, names = (self.world_size,), ("shard",)
        self._device_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def shard(self, model: nn.Module) -> None:
        """Shards the transformers/PEFT model in place and fills every rank's shards from rank 0's weights; called by
        the LightningModule's `configure_model` (once: a second call, for validate after fit, finds it sharded)."""
        if is_sharded(model):
            return
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        shard_from_rank0(model, self.device_mesh, "cpu" if self.cpu_offload else self.root_device,
                         reshard_after_forward=RESHARD_AFTER_FORWARD[self.sharding_strategy],
                         mp_policy=self.mixed_precision,
                         offload_policy=CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
                         per_layer=self.auto_wrap == "decoder_layers")
        log.info("fsdp: %d units over a %s mesh %s, %s", sum(isinstance(m, FSDPModule) for m in model.modules()),
                 "x".join(map(str, self.device_mesh.shape)), self.device_mesh.mesh_dim_names, self.sharding_strategy)


def shard_from_rank0(model: nn.Module, mesh: DeviceMesh, device: torch.device | str, **plan) -> None:
    """Shards `model` (whole on rank 0, on the meta device elsewhere) by `shard_model(**plan)`, gives every rank's
    empty shards memory on `device`, and fills them from rank 0's weights, one tensor at a time."""
    whole = model.state_dict() if dist.get_rank() == 0 else {}
    shard_model(model, mesh, **plan)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    for buffer in model.buffers():  # outside the state dict (rotary inv_freq): rank 0's, as they are
        dist.broadcast(buffer.data, src=0)


def shard_model(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool, mp_policy: MixedPrecisionPolicy,
                offload_policy: OffloadPolicy, per_layer: bool = True) -> None:
    """`fully_shard` on each decoder layer, then on the model: the sharding plan, in the order FSDP2 needs (inner
    units first, so the root holds only what no layer does)."""
    options = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    if per_layer:
        classes = decoder_layer_classes(model)
        for module in model.modules():
            if type(module) in classes:
                fully_shard(module, reshard_after_forward=reshard_after_forward, **options)
    # The root's parameters are gathered again at once for the backward: keep them through it.
    fully_shard(model, reshard_after_forward=False, **options)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward (transformers' own checkpointing, so module and checkpoint keys
    stay the model's)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):  # a frozen embedding would give the adapters no gradient
        model.enable_input_require_grads()


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (an empty dict elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())
