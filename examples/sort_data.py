"""A LightningDataModule of your own: a task generated in code (sort the letters of a word), tokenized with the run's
tokenizer.

    PYTHONPATH=examples python train.py data._target_=sort_data.SortLettersDataModule

What tunelab gives a data module: `tokenizer=` (the run's, from model.tokenizer or model.name_or_path) and every key
of the data option under it (data=tiny unless you pick another; add your own with +data.<key>=...): take the ones
you use by name and the rest with **kwargs. tunelab reads data.batch_size itself (the effective batch it logs).
What the module's batches must be: a dict of `input_ids`, `attention_mask` and `labels`, long tensors of one shape,
padded on the right, with labels -100 wherever no token is to be learned (prompt, padding).
"""

import logging
import random

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # the label cross-entropy skips
LETTERS = "abcdefghijklmnop"


class SortLettersDataModule(pl.LightningDataModule):
    def __init__(self, tokenizer, batch_size: int, seed: int, num_examples: int = 2000, val_size: float = 0.05,
                 **_option_keys):
        super().__init__()
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.num_examples = num_examples
        self.val_count = int(val_size) if val_size >= 1 else max(1, int(num_examples * val_size))

    def setup(self, stage: str | None = None) -> None:
        rng = random.Random(self.seed)
        words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(self.num_examples)]
        rows = [self.tokenize(f"sort {word}=", "".join(sorted(word))) for word in words]
        self.val, self.train = rows[:self.val_count], rows[self.val_count:]
        log.info("sort_data: %d train / %d val rows", len(self.train), len(self.val))

    def tokenize(self, prompt: str, answer: str) -> dict[str, list[int]]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt_ids = [*bos, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        answer_ids = [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
        return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": torch.full((len(rows), width), self.tokenizer.pad_token_id),
                 "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
                 "labels": torch.full((len(rows), width), IGNORE_INDEX)}
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            batch["input_ids"][i, :length] = torch.tensor(row["input_ids"])
            batch["attention_mask"][i, :length] = 1
            batch["labels"][i, :length] = torch.tensor(row["labels"])
        return batch

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + self.trainer.current_epoch)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
                          collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)
