"""Greedy answers: what a model says to a prompt.

The validation samples (tunelab.samples) and `generate.py` both ask through `greedy_answer`, so an exported model
answers a prompt as the last validation saw the trained model answer it.
"""

import torch
from transformers import GenerationConfig, PreTrainedModel


def end_tokens(eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.no_grad()
def greedy_answer(model: PreTrainedModel, prompt_ids: list[int], eos_token_id: int | list[int], pad_token_id: int | None,
                  max_new_tokens: int, device: torch.device | None = None, synced_gpus: bool = False) -> list[int]:
    """The tokens greedy decoding adds to the prompt, through the first end-of-sequence token or `max_new_tokens`.

    One prompt at a time, unpadded: tunelab's training attention (tunelab.packing) takes no padding mask. Greedy
    decoding draws no random numbers, so training's RNG streams stay where they were. `synced_gpus`: every rank keeps
    stepping until all are done, as sharded models (FSDP, ZeRO-3) need each forward on every rank."""
    ends = end_tokens(eos_token_id)
    if pad_token_id is None:
        pad_token_id = min(ends, default=None)  # one unpadded row: only generate() itself asks for one
    inputs = torch.tensor([prompt_ids], device=device if device is not None else model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                              eos_token_id=sorted(ends) or None, pad_token_id=pad_token_id)
    output = model.generate(inputs=inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                            synced_gpus=synced_gpus)
    answer = output[0, len(prompt_ids):].tolist()
    end = next((i for i, token in enumerate(answer) if token in ends), None)
    return answer if end is None else answer[: end + 1]
