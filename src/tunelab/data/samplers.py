"""The order rows are trained in: a seeded shuffle per epoch, split across ranks, packed into token budgets if asked,
and able to start mid-epoch after a resume."""

from collections.abc import Callable
from typing import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import Sampler


def pack_in_order(order: list[int], lengths: list[int], budget: int, open_batches: int = 16) -> list[list[int]]:
    """Example indices grouped into batches of at most `budget` tokens: first fit over the given (shuffled) order into
    up to `open_batches` batches at once, the oldest closing when another must open. Keeps the shuffle's mix, and
    fills batches better than closing each at the first example that does not fit."""
    batches, closed = [], []
    for index in order:
        n = lengths[index]
        target = next((batch for batch in batches if batch[0] + n <= budget), None)
        if target is None:
            if len(batches) == open_batches:
                closed.append(batches.pop(0)[1])
            target = [0, []]
            batches.append(target)
        target[0] += n
        target[1].append(index)
    return closed + [indices for _, indices in batches]


Order = Callable[[int], list[int]]  # epoch → indices, a pure function of it (tunelab.data.mixing.MixedOrder)


def shuffled(num_samples: int, seed: int, epoch: int, order: Order | None) -> list[int]:
    """The epoch's indices: `order`'s, or a seeded shuffle of all of them."""
    if order is not None:
        return order(epoch)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class PackedBatchSampler(Sampler[list[int]]):
    """Each epoch: a seeded shuffle (or `order`), packed greedily into batches of at most `budget` tokens, split across
    ranks (every rank gets as many batches), starting `skip` batches in after a mid-epoch resume."""

    def __init__(self, lengths: list[int], budget: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 order: Order | None = None):
        self.lengths, self.budget, self.seed, self.order = lengths, budget, seed, order
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        batches = pack_in_order(shuffled(len(self.lengths), self.seed, self.epoch, self.order), self.lengths, self.budget)
        return batches[self.rank : len(batches) - len(batches) % self.num_replicas : self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self._batches()[skip:]


class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch, split across ranks, that can start mid-epoch.

    Lightning restores the step counters of a mid-epoch checkpoint but replays the epoch's data from its first
    batch; skipping the batches already trained on keeps a resumed run on the data order of an unbroken one.
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0, order: Order | None = None):
        self.num_samples = num_samples  # as many as `order` gives, where one is given
        self.seed, self.order = seed, order
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = shuffled(self.num_samples, self.seed, self.epoch, self.order)[: len(self) * self.num_replicas]
        mine = order[self.rank :: self.num_replicas]
        skip, self.skip = self.skip, 0
        yield from mine[skip:]


def resume_position(sampler: ResumableSampler | PackedBatchSampler, trainer: pl.Trainer, items_per_batch: int = 1):
    """The sampler set to the trainer's current epoch, past the batches a restored checkpoint already trained on
    (`items_per_batch`: what the sampler yields per batch, indices for ResumableSampler, whole batches for a batch
    sampler)."""
    sampler.set_epoch(trainer.current_epoch)
    sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * items_per_batch
    return sampler


def resumable_sampler(trainer: pl.Trainer, num_samples: int, seed: int, batch_size: int,
                      order: Order | None = None) -> ResumableSampler:
    """This rank's sampler for the trainer's current epoch, past the batches a restored checkpoint already trained on."""
    sampler = ResumableSampler(num_samples, seed, trainer.world_size, trainer.global_rank, order)
    return resume_position(sampler, trainer, batch_size)
