"""Tokenized rows → batches: dynamically padded rows, or several rows packed into one for varlen attention."""

import torch

from tunelab.data.formats import IGNORE_INDEX


class InstructionCollator:
    """Pads each batch to its own longest row; padding is masked out of attention and of the loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def model_inputs(batch: dict) -> dict:
    """What the model is called with. tunelab's collators pad on the right, where causal attention alone keeps every
    real token from seeing padding, so the padding mask is left out: transformers then builds no mask and makes no
    check of one on the host (a GPU sync each forward). The mask stays in the batch for counting tokens."""
    return {key: value for key, value in batch.items() if key != "attention_mask"}


class PackedCollator:
    """Concatenates a batch's examples into one row of exactly `budget` tokens (the rest padding), for varlen
    attention (tunelab.packing): positions restart at 0 for each example, `cu_seq_lens_*` mark where each example (and
    the trailing padding, a segment of its own) starts, and each example's first label is -100, so no position learns
    the next example's first token. Shapes never change, so compiled layers see one shape."""

    def __init__(self, pad_token_id: int, budget: int):
        self.pad_token_id = pad_token_id
        self.budget = budget

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(row["input_ids"]) for row in rows]
        used = sum(lengths)
        if used > self.budget:
            raise ValueError(f"packed examples hold {used} tokens, more than the budget of {self.budget}")
        segments = lengths + ([self.budget - used] if used < self.budget else [])
        input_ids = torch.full((1, self.budget), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, self.budget), IGNORE_INDEX, dtype=torch.long)
        start = 0
        for row, n in zip(rows, lengths):
            input_ids[0, start:start + n] = torch.tensor(row["input_ids"])
            labels[0, start + 1:start + n] = torch.tensor(row["labels"][1:])
            start += n
        position_ids = torch.cat([torch.arange(n) for n in segments])[None]
        bounds = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(segments)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": (torch.arange(self.budget) < used).long()[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
