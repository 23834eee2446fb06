"""Per-rank batch sources. They yield dicts of numpy columns of exactly `batch_size` rows
({user_id, item_id, label, ...} for interaction models, {user_id, sequence, length} for sequence
models) and are wrapped in `lockstep` so that every rank runs the same number of steps."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.model_params import batch_kind_of
from core.negatives import NegativeSampler, with_negatives
from core.rank_plan import RankPlan
from core.sequences import load_sequences, window_spans
from trainers.distributed import all_agree

Batch = dict[str, np.ndarray]


class BatchSource(Protocol):
    """One rank's training batches, epoch by epoch (trainers/epoch.py iterates them)."""

    independent_epochs: bool
    """True: epochs share no state, so the trainer may start reading the next while one ends."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches on this rank, a function of (seed, rank, epoch): a resumed epoch
        skips the ones already trained and continues with the same rows."""
        ...

    def batches_in_epoch(self, epoch: int) -> int | None:
        """How many batches `epoch(epoch)` yields, without reading them; None when it cannot tell
        (the ranks then vote at every step instead of agreeing once per epoch)."""
        ...

    def close(self) -> None:
        """Stop whatever reads ahead (the trainer calls it when training ends)."""
        ...


def rank_source(config: RunConfig, dataset: PreparedDataset, plan: RankPlan,
                interactions: Callable[[NegativeSampler], BatchSource]) -> BatchSource:
    """A rank's batches, a function of (seed, epoch, rank): for sequence models the windows of its
    own shards' users; for interaction models `interactions(sampler)` (pyarrow under torchrun, a
    Ray Data pipeline in a Ray Train worker)."""
    params = config.model.resolved_params()
    batch_kind = batch_kind_of(params)
    if batch_kind == "sequence":
        return SequenceWindowsSource(dataset, params, config.trainer.batch_size, plan)
    return interactions(NegativeSampler(dataset.num_items, config.data.negatives, config.data.reject_positives,
                                        batch_kind=batch_kind))


class ParquetFilesSource:
    """This rank streams its own train shards with pyarrow and samples negatives itself.

    Used under torchrun (Ray Train workers run the same per-shard work as Ray Data tasks:
    cluster/rank_stream.py). Shards are dealt by the rank's `RankPlan`. An epoch visits the rank's shards in a seeded random order, a window of whole shards
    (about `window_rows` rows) at a time: a window is read and shuffled, and slice by slice its
    positives get negatives drawn against the window's own pairs (shards are user-partitioned, so they
    hold every positive of their users), are shuffled again and cut into batches. Memory is bounded
    by the window's positives (about 40 bytes a row), not by the dataset, and the batches of an epoch depend
    only on (seed, rank, epoch), so a resumed epoch can skip exactly the batches already trained.
    """

    WINDOW_ROWS = 1_000_000
    """Positives read and shuffled together (whole shards, so at least one shard): about 60 MB."""
    independent_epochs = True
    """epoch(e) shares no state with other epochs: the trainer may start reading the next epoch
    while this one ends (one more window in memory for a few steps)."""
    SLICE_ROWS = 65_536
    """Positives expanded with their negatives at a time."""

    def __init__(self, dataset: PreparedDataset, sampler: NegativeSampler, batch_size: int, plan: RankPlan,
                 window_rows: int = WINDOW_ROWS) -> None:
        self.dataset, self.plan = dataset, plan
        self.shards = plan.train_shards
        self.shard_rows = np.asarray(dataset.shard_rows("train"), dtype=np.int64)[self.shards]
        self.sampler = sampler
        self.batch_size = batch_size
        self.window_rows = window_rows

    @property
    def rows(self) -> int:
        """Positive rows this rank trains on per epoch."""
        return self.plan.train_rows(self.shard_rows)

    def batches_in_epoch(self, epoch: int) -> int:
        """Whole batches an epoch yields (the partial batch at the end of a slice carries over)."""
        return self.sampler.expanded_rows(self.rows) // self.batch_size

    def close(self) -> None:
        """Nothing reads ahead of `epoch`'s generator."""

    def _windows(self, order: np.ndarray) -> Iterator[np.ndarray]:
        window: list[int] = []
        rows = 0
        for index in order:
            window.append(int(index))
            rows += int(self.shard_rows[index])
            if rows >= self.window_rows:
                yield np.asarray(window)
                window, rows = [], 0
        if window:
            yield np.asarray(window)

    def _read(self, shards: np.ndarray) -> tuple[Batch, Batch]:
        """(every positive of these shards, the rows this rank trains on): striped shard by shard, so
        the ranks' shares of a shard are complementary whatever order each rank reads them in."""
        parts = [self.dataset.read_shards("train", [shard], columns=("user_id", "item_id")) for shard in shards]
        positives = {name: np.concatenate([part[name] for part in parts]) for name in ("user_id", "item_id")}
        if not self.plan.striped:
            return positives, positives
        stripes = [self.plan.mine(part) for part in parts]
        return positives, {name: np.concatenate([stripe[name] for stripe in stripes]) for name in ("user_id", "item_id")}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng((self.plan.rank_seed, epoch))
        carry: Batch | None = None
        for window in self._windows(rng.permutation(len(self.shards))):
            positives, mine = self._read(self.shards[window])
            known = self.sampler.known_keys(positives) if self.sampler.reject_positives else None
            order = rng.permutation(len(mine["user_id"]))
            # Negatives are drawn a slice of the shuffled positives at a time, so the expanded rows
            # never exist for the whole window at once.
            for first in range(0, len(order), self.SLICE_ROWS):
                index = order[first : first + self.SLICE_ROWS]
                expanded = with_negatives(self.sampler, {name: values[index] for name, values in mine.items()}, rng, known)
                if carry is not None:  # the last partial batch of the previous slice leads this one
                    expanded = {name: np.concatenate([carry[name], values]) for name, values in expanded.items()}
                whole = len(expanded["user_id"]) - len(expanded["user_id"]) % self.batch_size
                for start in range(0, whole, self.batch_size):
                    yield {name: values[start : start + self.batch_size] for name, values in expanded.items()}
                carry = {name: values[whole:] for name, values in expanded.items()}


class SequenceWindowsSource:
    """For sequence models, under torchrun and Ray Train alike: a rank cuts windows from the
    histories of its own shards' users only (its `RankPlan`; windows striped when the shards do not
    divide), and shuffles them each epoch with (rank seed, epoch)."""

    independent_epochs = True
    """epoch(e) shares no state with other epochs (see ParquetFilesSource)."""

    def __init__(self, dataset: PreparedDataset, params: Any, batch_size: int, plan: RankPlan) -> None:
        self.plan = plan
        self.table = load_sequences(dataset, [int(shard) for shard in plan.train_shards])
        # Where the windows lie, not their padded tokens: each batch cuts its own (O(batch)).
        self.spans = window_spans(self.table.indptr, params.window, params.resolved_window_step, params.min_window)
        self.window = params.window
        self.batch_size = batch_size

    def batches_in_epoch(self, epoch: int) -> int:
        return self.plan.rows_of(len(self.spans)) // self.batch_size

    def close(self) -> None:
        """Nothing reads ahead of `epoch`'s generator."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.plan.striped:  # every rank holds every window: a shared order, every world-th one
            order = np.random.default_rng((self.plan.seed, epoch)).permutation(len(self.spans))
            mine = self.plan.take(order)
        else:
            mine = np.random.default_rng((self.plan.rank_seed, epoch)).permutation(len(self.spans))
        for start in range(0, len(mine) - self.batch_size + 1, self.batch_size):
            index = mine[start : start + self.batch_size]
            yield self.spans.cut(index, self.table.users, self.table.indptr, self.table.train, self.window)


def fixed_chunks(blocks: Iterator[Batch], rows: int) -> Iterator[Batch]:
    """The rows of `blocks` (of any sizes), in order, cut into chunks of exactly `rows` rows, the
    last one shorter. A block that already is a chunk is passed on without a copy."""
    pending: list[Batch] = []
    held = 0
    for block in blocks:
        size = len(next(iter(block.values())))
        start = 0
        while start < size:
            take = min(rows - held, size - start)
            pending.append(block if take == size else {name: values[start : start + take] for name, values in block.items()})
            held += take
            start += take
            if held == rows:
                yield _joined(pending)
                pending, held = [], 0
    if pending:
        yield _joined(pending)


def _joined(parts: list[Batch]) -> Batch:
    """The rows of `parts`, in order, as one batch (the one part itself, uncopied, when alone)."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def exact_batches(batches: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
    """Batches of exactly `batch_size` rows, in order, from batches (or blocks) of any sizes; a
    last partial batch is dropped. Every rank's step must see the same batch size: TorchRec's
    collectives refuse unequal ones. (The Ray stream's blocks come in any size; with its shuffle
    buffer off they are cut here.)"""
    for batch in fixed_chunks(batches, batch_size):
        if len(next(iter(batch.values()))) == batch_size:
            yield batch


SHUFFLE_CHUNK_ROWS = 262_144
"""Rows shuffled_batches takes in at a time, whatever the sizes of the blocks it is given."""


def shuffled_batches(blocks: Iterator[Batch], batch_size: int, buffer_rows: int, seed: int) -> Iterator[Batch]:
    """Batches of exactly `batch_size` rows from blocks of any sizes, rows mixed across block
    boundaries through a buffer of `buffer_rows` (0: in order, as `exact_batches`); the last
    partial batch is dropped, so an epoch yields total rows // batch_size batches.

    Vectorised: each chunk of SHUFFLE_CHUNK_ROWS rows is joined to the buffer, the lot permuted once,
    and every whole batch beyond `buffer_rows` cut off the front, so a row is copied about
    (1 + buffer/chunk) times.
    Ray Data's own local shuffle re-assembles its buffer for every batch it yields, which at 10M
    interactions and more is many times slower than reading the data."""
    if not buffer_rows:
        yield from exact_batches(blocks, batch_size)
        return
    rng = np.random.default_rng(seed)
    pool: Batch | None = None
    # In chunks of a fixed size, not block by block: every permutation below then depends on the
    # rows alone. Ray Data's blocks are cut where its executor's buffers happen to end (an epoch
    # that begins inside a task's output, or a pipeline started at a resumed epoch, gives other
    # block boundaries), and a resumed epoch must see the same batches as the original one.
    for block in fixed_chunks(blocks, SHUFFLE_CHUNK_ROWS):
        pool = block if pool is None else _joined([pool, block])
        rows = len(next(iter(pool.values())))
        whole = (rows - buffer_rows) // batch_size * batch_size
        if whole <= 0:
            continue
        order = rng.permutation(rows)
        pool = {name: values[order] for name, values in pool.items()}
        for start in range(0, whole, batch_size):
            yield {name: values[start : start + batch_size] for name, values in pool.items()}
        pool = {name: values[whole:] for name, values in pool.items()}
    if pool is not None:
        rows = len(next(iter(pool.values())))
        order = rng.permutation(rows)
        for start in range(0, rows - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield {name: values[index] for name, values in pool.items()}


def to_tensors(batch: Batch, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Copy (Ray Data and pyarrow hand out read-only views) into int64 ids and float32 labels on `device`; to a
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
