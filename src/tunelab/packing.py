"""Causal attention for training batches, packed (`data.packing=true`) or one right-padded example a row.

Registered with transformers' AttentionInterface as `tunelab_causal`, and given to models that asked for `sdpa`
(tunelab.model). A packed batch (tunelab.data.PackedCollator) carries `cu_seq_lens_q/k` and `max_length_q/k`, which
transformers passes through the model to the attention function, and each example attends only to itself: on CUDA
through PyTorch's variable-length flash attention (torch.nn.attention.varlen), elsewhere one example at a time. Any
other batch gets transformers' own sdpa attention with `is_causal`, exact on every real token of a right-padded row.
The name has no mask function registered, so transformers builds no (tokens x tokens) mask and makes no host-side
check of one, a GPU sync on every forward of the plain `sdpa` path.
"""

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

TRAINING_ATTENTION = "tunelab_causal"


def varlen_kernel():
    """PyTorch's varlen flash attention and the keywords that make it causal (its API changed between releases: 2.11
    takes is_causal, later ones a (-1, 0) window), or (None, {}) where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    return varlen_attn, causal | ({"enable_gqa": True} if "enable_gqa" in parameters else {})


VARLEN, VARLEN_CAUSAL = varlen_kernel()


def causal_varlen(query, key, value, bounds, longest: int, scale: float | None) -> torch.Tensor:
    """(tokens, heads, dim) attention of each segment [bounds[i], bounds[i+1]) to itself, causally, on CUDA."""
    if query.size(1) != key.size(1) and "enable_gqa" not in VARLEN_CAUSAL:
        key = key.repeat_interleave(query.size(1) // key.size(1), dim=1)
        value = value.repeat_interleave(query.size(1) // value.size(1), dim=1)
    return VARLEN(query, key, value, bounds, bounds, longest, longest, scale=scale, **VARLEN_CAUSAL)


def causal_per_segment(query, key, value, bounds, scale: float | None) -> torch.Tensor:
    """The same, one segment at a time through scaled_dot_product_attention (any device)."""
    out = torch.empty_like(query)
    groups = query.size(1) // key.size(1)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function contract: query (batch, heads, tokens, dim), key/value (batch, kv heads,
    tokens, dim) in; (batch, tokens, heads, dim) out, and no attention weights."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    if query.size(0) != 1:
        raise ValueError(f"packed attention takes one packed row per batch, got {query.size(0)}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if q.is_cuda and VARLEN is not None:
        out = causal_varlen(q, k, v, bounds, int(kwargs["max_length_q"]), scaling)
    else:
        out = causal_per_segment(q, k, v, bounds, scaling)
    return out[None], None


AttentionInterface.register(TRAINING_ATTENTION, causal_attention)
