"""The log-probability of each row's labelled tokens, for a module whose loss is built on them (DPO's log-ratios
against a reference; any policy-gradient stage): from the model's logits, or, with the fused loss path, from the last
hidden state and the output projection a chunk of tokens at a time, never the (tokens x vocab) logits."""

import torch
from torch import nn

from tunelab.data.formats import IGNORE_INDEX
from tunelab.kernels import decoder_output

FORWARD_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class ChunkedTargetLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for each row, `chunk` rows at a time: memory is chunk x vocab, never
    rows x vocab. The backward pass computes each chunk's logits again (one more matmul) instead of keeping them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 up to fp32, fp64 stays
        out = torch.empty(hidden.size(0), dtype=dtype, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            logits = (hidden[start:start + chunk] @ weight.T).to(dtype)
            target = targets[start:start + chunk, None]
            out[start:start + chunk] = (logits.gather(1, target) - logits.logsumexp(-1, keepdim=True)).squeeze(1)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = hidden[start:start + ctx.chunk]
            logits = (rows @ weight.T).to(dtype)
            # d logp[target] / d logits = one_hot(target) - softmax(logits)
            grad_logits = -logits.softmax(-1)
            grad_logits.scatter_add_(1, targets[start:start + ctx.chunk, None], torch.ones_like(grad_logits[:, :1]))
            grad_logits = (grad_logits * grad_out[start:start + ctx.chunk, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, rows)
        return grad_hidden, grad_weight, None, None


def forward_inputs(batch: dict) -> dict:
    """What the model is called with: the token ids (and a packed row's positions and bounds), none of the batch's
    labels, padding mask (right padding: causal attention keeps real tokens off it) or pair indices."""
    return {key: batch[key] for key in FORWARD_KEYS if key in batch}


def sequence_logps(model: nn.Module, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, their count), in float32 or wider. `chunk_size`: from the
    last hidden state a chunk of labelled tokens at a time (no logits); None: from the model's own logits."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    counts = (labels != IGNORE_INDEX).sum(1)
    if chunk_size is None:
        logits = model(**forward_inputs(batch), use_cache=False).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return (token_logps * labelled).sum(1), counts
    hidden, head = decoder_output(model, forward_inputs(batch))
    hidden = hidden[:, :-1]
    rows, columns = labelled.nonzero(as_tuple=True)
    token_logps = ChunkedTargetLogProbs.apply(hidden[rows, columns], head.weight, targets[rows, columns], chunk_size)
    return token_logps.new_zeros(labels.size(0)).index_add(0, rows, token_logps), counts
