"""The log-probability of each sequence's labelled tokens, for a module whose loss is built on them (DPO's log-ratios
against a reference; any policy-gradient stage): from the model's logits, or, with the fused loss path, from the last
hidden state and the output projection a chunk of tokens at a time, never the (tokens x vocab) logits. A sequence is
a row of a padded batch, or a segment of a packed one (data.packing: several sequences in one row, kept apart by
varlen attention), whose values are summed per segment without leaving the device."""

from typing import NamedTuple

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


class SequenceLogps(NamedTuple):
    """Per sequence: the summed log-probability of its labelled (answer) tokens and their count; with `whole=True`,
    also of every token after its first, prompt included (ORPO's NLL term, as trl computes it)."""
    answer: torch.Tensor
    answer_tokens: torch.Tensor
    whole: torch.Tensor | None = None
    whole_tokens: torch.Tensor | None = None


def sequence_of_targets(batch: dict) -> tuple[torch.Tensor, int]:
    """The sequence each target position (labels[:, 1:]) belongs to, and how many sequences there are: a padded
    batch's rows, or a packed row's segments (tunelab.data.PackedCollator: positions restart at 0 for each, and the
    trailing padding, where there is any, is the last). Found from shapes and positions alone: no host sync."""
    labels = batch["labels"]
    if "cu_seq_lens_q" not in batch:
        rows = torch.arange(labels.size(0), device=labels.device)
        return rows[:, None].expand(-1, labels.size(1) - 1), labels.size(0)
    segment = (batch["position_ids"] == 0).long().cumsum(-1) - 1
    return segment[:, 1:], batch["cu_seq_lens_q"].numel() - 1


def sequence_logps(model: nn.Module, batch: dict, chunk_size: int | None = None, whole: bool = False) -> SequenceLogps:
    """Each sequence's summed log-probability (SequenceLogps), in float32 or wider; a packed row gives one value per
    segment. `chunk_size`: from the last hidden state a chunk of scored tokens at a time (no logits); None: from the
    model's own logits."""
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX
    scored = labelled
    if whole:  # every real token but each sequence's first (a packed row masks those labels for the same reason)
        scored = batch["attention_mask"][:, 1:].bool()
        if "position_ids" in batch:
            scored = scored & (batch["position_ids"][:, 1:] != 0)
    targets = torch.where(labelled, targets, batch["input_ids"][:, 1:])
    sequence, count = sequence_of_targets(batch)
    if chunk_size is None:
        logits = model(**forward_inputs(batch), use_cache=False).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps = logits.log_softmax(-1).gather(2, targets[..., None]).squeeze(2) * scored
    else:
        hidden, head = decoder_output(model, forward_inputs(batch))
        rows, columns = scored.nonzero(as_tuple=True)
        token_logps = torch.zeros(scored.shape, dtype=torch.promote_types(hidden.dtype, torch.float32),
                                  device=hidden.device)
        token_logps = token_logps.index_put((rows, columns), ChunkedTargetLogProbs.apply(
            hidden[:, :-1][rows, columns], head.weight, targets[rows, columns], chunk_size))

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(count).index_add(0, sequence.flatten(), values.flatten())

    answer = per_sequence(token_logps * labelled)
    answer_tokens = per_sequence(labelled.to(token_logps.dtype)).long()
    if not whole:
        return SequenceLogps(answer, answer_tokens)
    return SequenceLogps(answer, answer_tokens, per_sequence(token_logps), per_sequence(scored.to(token_logps.dtype)).long())
