"""Per-rank batch sources. They yield dicts of numpy columns of exactly `batch_size` rows
({user_id, item_id, label, ...} for interaction models, {user_id, sequence, length} for sequence
models) and are wrapped in `lockstep` so that every rank runs the same number of steps."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.sequences import load_sequences, training_windows
from trainers.distributed import all_agree

Batch = dict[str, np.ndarray]


class BatchSource(Protocol):
    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class RayShardSource:
    """Batches from this rank's Ray Data stream (`streaming_split(world, equal=True)` done by Ray Train)."""

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer

    def epoch(self, epoch: int) -> Iterator[Batch]:
        yield from self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
        )


class ParquetFilesSource:
    """Without Ray: this rank reads train files rank::world with pyarrow and samples negatives itself.

    Used under plain torchrun. Files are striped over ranks when they divide evenly, so ranks see
    different rows; otherwise rows are striped, so no rank's share is cut short.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        sampler: NegativeSampler,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        files = dataset.split_files("train")
        if len(files) % world_size == 0:
            rows = dataset.read_split("train", files[rank::world_size])
        else:  # whole files per rank would give ranks unequal shares, and the shortest rank ends the epoch
            every = dataset.read_split("train")
            rows = {name: values[rank::world_size] for name, values in every.items()}
        self.users, self.items = rows["user_id"], rows["item_id"]
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed + 1000 * rank

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng((self.seed, epoch))
        expanded = self.sampler({"user_id": self.users, "item_id": self.items}, rng)
        order = rng.permutation(len(expanded["user_id"]))
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            index = order[start : start + self.batch_size]
            yield {name: values[index] for name, values in expanded.items()}


class SequenceWindowsSource:
    """Without Ray, for sequence models: every rank cuts the same windows from the users' histories
    (core/sequences.py), shuffles them with the shared seed, and takes every world-th one."""

    def __init__(self, dataset: PreparedDataset, params: Any, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        table = load_sequences(dataset)
        histories = [table.train_of(user) for user in range(table.num_users)]
        self.windows = training_windows(np.arange(table.num_users), histories, params.window, params.resolved_window_step,
                                        params.min_window)
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.windows["user_id"]))
        mine = order[self.rank :: self.world_size]
        for start in range(0, len(mine) - self.batch_size + 1, self.batch_size):
            index = mine[start : start + self.batch_size]
            yield {name: values[index] for name, values in self.windows.items()}


def to_tensors(batch: Batch, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Copy (Ray Data hands out read-only views) into int64 ids and float32 labels on `device`; to a
    GPU through pinned memory, without blocking the host."""
    device = torch.device(device)
    out = {}
    for name, values in batch.items():
        host = torch.tensor(values, dtype=torch.float32 if name == "label" else torch.int64, device="cpu")
        if device.type == "cuda":
            out[name] = host.pin_memory().to(device, non_blocking=True)
        else:
            out[name] = host
    return out


def lockstep(batches: Iterator[Batch], max_steps: int = 0) -> Iterator[Batch]:
    """Yield batches while every rank still has one (and under max_steps, if set)."""
    step = 0
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if max_steps and step >= max_steps:
            batch = None
        if not all_agree(batch is not None):
            return
        yield batch  # type: ignore[misc]
        step += 1


ID_COLUMNS = {"user_id": "users", "item_id": "items", "neg_item_id": "items"}


def check_ids(batch: Batch, num_users: int, num_items: int) -> None:
    """Refuse a batch holding an id outside its table: TorchRec would silently train row 0 instead.
    Cheap (a min and a max per column); prepared datasets are also checked when opened."""
    limits = {"users": num_users, "items": num_items}
    for column, table in ID_COLUMNS.items():
        if column in batch and len(batch[column]):
            low, high = int(batch[column].min()), int(batch[column].max())
            if low < 0 or high >= limits[table]:
                bad = low if low < 0 else high
                raise ValueError(f"a training batch holds {column} {bad}, outside [0, {limits[table]}): the data "
                                 "does not match its stats.json; prepare the dataset again")
