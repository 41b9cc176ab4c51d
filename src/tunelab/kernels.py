"""Builds the `kernels` group: the fast path of a training step.

- `loss: liger | chunked` computes the cross-entropy from the last hidden state and the output projection chunk by
  chunk, so the full (tokens x vocab) logits never exist: liger-kernel's fused linear cross-entropy (Triton, CUDA
  only), or tunelab's ChunkedLinearCrossEntropy (plain PyTorch, any device). `plain` is the model's own
  `model(**batch).loss`.
- `compile: layers` compiles each decoder layer in place (`nn.Module.compile`), so parameter and checkpoint keys stay
  the model's own.
- `fused_ops: liger` gives this model instance liger-kernel's RMSNorm and SwiGLU kernels by rebinding the forward of
  its own modules; transformers' classes are never patched, so the next model built in the process is untouched.
  `fused_ops: native` rebinds RMSNorm to LeanRMSNorm, which torch.compile fuses and which keeps only its bf16 input
  and one fp32 scale per row for the backward pass (transformers' RMSNorm leaves an fp32 copy of the input there).

`auto` turns each on where it pays: on a CUDA device, and (for the liger pieces) where liger-kernel is installed;
tunelab.kernel_choice decides that from the config alone, before anything heavy is imported.
"""

import logging
from types import MethodType

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tunelab.data import IGNORE_INDEX, model_inputs
from tunelab.decoder_layers import decoder_layer_classes

log = logging.getLogger(__name__)


# ── the loss ──────────────────────────────────────────────────────────────────────────────────────────────────────


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), computed `chunk` rows at a
    time. The gradients are computed chunk by chunk in the forward pass, so neither the logits nor their gradient are
    ever held whole: memory is chunk x vocab instead of tokens x vocab."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        for start in range(0, hidden.size(0), chunk):
            rows = hidden[start:start + chunk]
            mask = valid[start:start + chunk]
            target = torch.where(mask, targets[start:start + chunk], 0)
            logits = rows @ weight.T
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32, fp64 stays
            log_z = logits.logsumexp(-1)
            total += ((log_z - logits.gather(1, target[:, None]).squeeze(1)) * mask).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows.
            grad_logits = (logits - log_z[:, None]).exp_()
            grad_logits.scatter_add_(1, target[:, None], -torch.ones_like(log_z)[:, None])
            grad_logits = (grad_logits * mask[:, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, rows)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None, None, None)


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """kernels.loss=plain: the model's own causal-LM loss, over logits it materialises whole."""
    return model(**model_inputs(batch), use_cache=False).loss


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t learns token t+1, as transformers' causal-LM loss does; each row's last position learns nothing."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The transformers model's decoder stack (hidden states out) and its output projection, through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"kernels.loss=liger or chunked needs the output projection to be a plain nn.Linear, not "
                         f"{type(head).__name__} (an adapter on lm_head?): use kernels.loss=plain")
    return base.get_decoder(), head


class FusedLinearLoss:
    """The causal-LM loss from the last hidden state, never materialising the logits (see the module docstring)."""

    def __init__(self, model: nn.Module, chunk_size: int, use_liger: bool):
        decoder_and_head(model)  # refuses an output projection it cannot fuse, before training starts
        self.chunk_size = chunk_size
        self.use_liger = use_liger

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        hidden, head = last_hidden_state(model, batch)
        hidden = hidden.reshape(-1, hidden.size(-1))
        targets = shifted_targets(batch["labels"]).reshape(-1)
        if self.use_liger:
            return liger_linear_cross_entropy(hidden, head.weight, targets)
        return ChunkedLinearCrossEntropy.apply(hidden, head.weight, targets, self.chunk_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, per-row exact match) with logits computed only where there is a target, chunk by chunk."""
        hidden, head = last_hidden_state(model, batch)
        targets = shifted_targets(batch["labels"])
        rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        total = hidden.new_zeros((), dtype=torch.float32)
        wrong = torch.zeros(targets.size(0), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), self.chunk_size):
            r, c = rows[start:start + self.chunk_size], columns[start:start + self.chunk_size]
            logits, target = head(hidden[r, c]).float(), targets[r, c]
            total += nn.functional.cross_entropy(logits, target, reduction="sum")
            wrong.index_add_(0, r, (logits.argmax(-1) != target).float())
        return total / max(rows.numel(), 1), (wrong == 0).float()


def last_hidden_state(model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Linear]:
    return decoder_output(model, {k: v for k, v in model_inputs(batch).items() if k != "labels"})


def decoder_output(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, nn.Linear]:
    """The decoder's last hidden state for `inputs`, and the output projection to apply to it.

    Under FSDP2 the model itself is called: its forward hooks gather the weights the root unit holds (embeddings, final
    norm, output projection), which a call to the decoder alone would leave sharded, and they stay gathered for the
    loss and its backward. The head then computes the logits of one position only."""
    decoder, head = decoder_and_head(model)
    if not isinstance(model, FSDPModule):
        return decoder(**inputs, use_cache=False).last_hidden_state, head
    hidden = []
    hook = decoder.register_forward_hook(lambda module, args, output: hidden.append(output.last_hidden_state))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return hidden[0], head


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="mean")


def build_loss(choice: dict[str, str], model: nn.Module, chunk_size: int):
    """A callable (model, batch) -> scalar training loss, for the kernels `resolve_kernels` chose."""
    loss = choice["loss"]
    if loss == "plain":
        return model_loss
    return FusedLinearLoss(model, chunk_size, use_liger=loss == "liger")


# ── the layers ────────────────────────────────────────────────────────────────────────────────────────────────────


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    classes = decoder_layer_classes(model)
    return [module for module in model.modules() if type(module) in classes]


def liger_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


class LeanRMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)), computed in fp32 and rounded to x's dtype before the weight, as transformers' Llama
    RMSNorm does; the backward pass recomputes the normalised input from x and the saved per-row 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inverse_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return weight * (x.float() * inverse_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, inverse_rms = ctx.saved_tensors
        normalised = x.float() * inverse_rms
        grad_weight = (grad * normalised.to(x.dtype)).float().reshape(-1, x.size(-1)).sum(0).to(weight.dtype)
        g = grad.float() * weight.float()
        grad_x = inverse_rms * (g - normalised * (g * normalised).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def liger_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def is_llama_rms_norm(module: nn.Module) -> bool:
    """A weight-times-normalised-input RMSNorm (Llama, Qwen2, Mistral), not one with an offset weight (Gemma)."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(module, "variance_epsilon") \
        and getattr(module, "weight", None) is not None


def is_gated_silu_mlp(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) and config is not None \
        and getattr(config, "hidden_act", None) in ("silu", "swish")


def apply_fused_ops(model: nn.Module, kind: str) -> int:
    """Rebinds the forward of this model's RMSNorm modules (liger: and gated-SiLU MLPs) to fused kernels; returns how
    many modules changed."""
    patched = 0
    for module in model.modules():
        if is_llama_rms_norm(module):
            module.forward = MethodType(liger_rms_norm_forward if kind == "liger" else lean_rms_norm_forward, module)
            patched += 1
        elif kind == "liger" and is_gated_silu_mlp(module):
            module.forward = MethodType(liger_swiglu_forward, module)
            patched += 1
    return patched


def apply_kernels(model: nn.Module, choice: dict[str, str], compile_mode: str | None = None) -> nn.Module:
    """The model with the fused ops and compiled layers `resolve_kernels` chose, in place (its state_dict keys are unchanged)."""
    if choice["fused_ops"] != "none":
        log.info("kernels: %s fused ops on %d modules of this model", choice["fused_ops"], apply_fused_ops(model, choice["fused_ops"]))
    if choice["compile"] == "layers":
        layers = decoder_layers(model)
        for layer in layers:
            layer.compile(mode=compile_mode)
        log.info("kernels: %d decoder layers compiled (torch.compile, mode %s)", len(layers), compile_mode)
    log.info("kernels: loss %s", choice["loss"])
    return model
