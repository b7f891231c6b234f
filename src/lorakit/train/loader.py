"""The run's batches: one DataLoader for the whole run, each process's share of every epoch, and the seeds that
make every batch's random draws depend on its place in the run alone.

An item is keyed by (epoch, index among the epoch's batches, the optimizer step it trains): a worker rebuilds any
epoch's batch list from the seed, so the same DataLoader serves every epoch and, with
`--persistent_data_loader_workers`, its workers live from the first epoch to the last."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lorakit.data.dataset import BatchLoader, TrainBatch, TrainingData
from lorakit.errors import LorakitError
from lorakit.train.interrupt import ignore_stop_signals, stop_signals_blocked

Key = tuple[int, int, int]  # (epoch, batch index in the epoch, optimizer step of the batch)


class RunBatches(torch.utils.data.Dataset):
    """Every batch of the run by its `Key`; the epoch's batch list is rebuilt (and kept) when the epoch changes."""

    def __init__(self, data: TrainingData, *, seed: int, max_train_steps: int, latents: Mapping | None,
                 text: Mapping | None, masked_loss: bool) -> None:
        self.data, self.seed, self.max_train_steps = data, seed, max_train_steps
        self.latents, self.text, self.masked_loss = latents, text, masked_loss
        self._epoch, self._batches = 0, []

    def __getitem__(self, key: Key) -> TrainBatch | UnreadableBatch:
        epoch, index, step = key
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.data.epoch_batches(epoch)
        try:
            return BatchLoader(self._batches, seed=self.seed, epoch=epoch, step_of_batch=lambda _: step,
                               max_train_steps=self.max_train_steps, latents=self.latents, text=self.text,
                               masked_loss=self.masked_loss)[index]
        except LorakitError as error:  # raised in a worker, torch would wrap it in a multi-line traceback
            return UnreadableBatch(str(error))


@dataclass(frozen=True)
class UnreadableBatch:
    """A batch that could not be made (an image changed after the scan): its message reaches the main process."""

    message: str


class EpochKeys(torch.utils.data.Sampler):
    """The keys of the epoch being loaded; a persistent DataLoader reads them afresh at each `iter()`."""

    def __init__(self) -> None:
        self.keys: list[Key] = []

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class RunLoader:
    """This process's batches, epoch by epoch, from one DataLoader whose workers start once per run with
    `persistent` (`--persistent_data_loader_workers`), else once per epoch."""

    def __init__(self, data: TrainingData, *, seed: int, max_train_steps: int, latents: Mapping | None,
                 text: Mapping | None, masked_loss: bool, workers: int, persistent: bool, rank: int, world: int,
                 gradient_accumulation_steps: int) -> None:
        self.data, self.rank, self.world, self.gas = data, rank, world, gradient_accumulation_steps
        self.keys = EpochKeys()
        self.loader = torch.utils.data.DataLoader(
            RunBatches(data, seed=seed, max_train_steps=max_train_steps, latents=latents, text=text,
                       masked_loss=masked_loss),
            sampler=self.keys, batch_size=None, num_workers=workers, persistent_workers=persistent and workers > 0,
            worker_init_fn=ignore_stop_signals,
            # Worker seeds come from a generator of the loader's own: each iter() of a DataLoader draws one, and
            # from the global RNG that would make dropout depend on the worker settings.
            generator=torch.Generator().manual_seed(seed))

    def share(self, epoch: int) -> list[int]:
        """Indices of this process's batches among the epoch's (see `shard`)."""
        return shard(list(range(len(self.data.epoch_batches(epoch)))), self.rank, self.world)

    def epoch(self, epoch: int, indices: list[int], first_step: int) -> Iterator[tuple[int, TrainBatch]]:
        """(index among the epoch's batches, batch) for `indices`; the epoch's batch i trains optimizer step
        `first_step + i // world // gradient_accumulation_steps` (caption schedules read it)."""
        self.keys.keys = [(epoch, i, first_step + i // self.world // self.gas) for i in indices]
        with stop_signals_blocked():  # iter() forks the workers (every epoch, or once when persistent)
            batches = iter(self.loader)
        return zip(indices, map(_readable, batches))


def _readable(batch: TrainBatch | UnreadableBatch) -> TrainBatch:
    if isinstance(batch, UnreadableBatch):
        raise LorakitError(batch.message)
    return batch


def shard(batches: list, rank: int, world: int) -> list:
    """This process's share of an epoch's batches (every world-th, padded by wrapping so all ranks step equally)."""
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[rank::world]


def batch_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one batch's noise, timesteps and on-the-fly VAE samples, seeded by its place in the run
    (global batch index across processes): a resumed run, or N processes, draw what one uninterrupted run does."""
    return torch.Generator("cpu").manual_seed(random.Random(f"lorakit-noise-{seed}-{epoch}-{batch_index}")
                                              .getrandbits(63))


def data_loader_workers(requested: int) -> int:
    return min(requested, os.cpu_count() or 1)


def validation_batches(data: TrainingData, *, seed: int, max_train_steps: int, latents: Mapping[Path, object] | None,
                       text: Mapping[Path, object] | None, masked_loss: bool, rank: int, world: int) -> BatchLoader:
    """This process's share of the held-out batches, drawn as epoch 1's at step 0."""
    return BatchLoader(shard(data.epoch_batches(1), rank, world), seed=seed, epoch=1, step_of_batch=lambda i: 0,
                       max_train_steps=max_train_steps, latents=latents, text=text, masked_loss=masked_loss)
