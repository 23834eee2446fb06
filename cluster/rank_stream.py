"""The Ray Data training stream of one rank: a pure function of (seed, epoch, rank) and the dataset.

Each Ray Train worker runs its own Ray Data pipeline over its own train shards (dealt by
`core.rank_plan.RankPlan`, as the torchrun ranks' are): in an order drawn from (seed, epoch),
Ray tasks (a shard each, or several consecutive small ones, of one epoch or of consecutive
epochs) read each shard, shuffle it and draw its negatives with a generator seeded by (seed,
epoch, shard), against the shard's own positives (shards are user-partitioned). The blocks come
back in that order (`preserve_order`) and are batched through a shuffle buffer with a seed of its
own. So the epoch's batches are the same on every run (however the shards are grouped into
tasks), and a resumed epoch that skips the batches already trained continues with exactly the
rows that were not (exactly-once positives, as under torchrun).
Ray Data still runs the reads and the sampling in a task beside the training step, held to the
trainer's pace (`pipeline`).

One pipeline serves the whole run (an epoch's tasks, epoch after epoch), so Ray Data works
through evaluations into the next epoch, and an epoch costs no new pipeline: at ML-100K size a
pipeline's start (about 0.3 s) outweighed the epoch's data.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import ray.data

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from upstream.ray_private import pace_idle_executors
from cluster.shard_sampling import SHARD_TASK_CPUS, SampledShard, group_units
from core.rank_plan import RankPlan
from trainers.batches import Batch, shuffled_batches


class RayRankStream:
    """A BatchSource for one Ray Train worker (see the module docstring)."""

    independent_epochs = False
    """Epochs share one pipeline: the next epoch continues where this one's blocks end."""

    def __init__(self, dataset: PreparedDataset, sampler: NegativeSampler, batch_size: int, shuffle_buffer: int,
                 plan: RankPlan, last_epoch: int | None = None, block_rows: int = SampledShard.BLOCK_ROWS) -> None:
        self.plan = plan
        self.shards = plan.train_shards
        self.files = {int(shard): str(dataset.shard_file("train", int(shard))) for shard in self.shards}
        shard_rows = np.asarray(dataset.shard_rows("train"), dtype=np.int64)[self.shards]
        self.shard_positives = {int(shard): plan.rows_of(int(rows)) for shard, rows in zip(self.shards, shard_rows)}
        """Positive rows this rank takes from each of its shards."""
        self.rows = sum(self.shard_positives.values())
        """Positive rows this rank trains on per epoch."""
        self.sampler = sampler
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.last_epoch = last_epoch
        """The pipeline runs through this epoch (None: one epoch per pipeline)."""
        self.block_rows = block_rows
        """Rows of a whole block of the shard tasks (see SampledShard)."""
        self._blocks: _EpochBlocks | None = None

    def batches_in_epoch(self, epoch: int) -> int:
        """Whole batches an epoch yields (shuffled_batches drops the last partial one)."""
        return self.epoch_rows() // self.batch_size

    def epoch_rows(self) -> int:
        """Rows (positives and their negatives) an epoch's blocks hold."""
        return self.sampler.expanded_rows(self.rows)

    def close(self) -> None:
        """Stop the pipeline (the trainer calls this when training ends)."""
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    def _order(self, epoch: int) -> tuple[np.ndarray, int]:
        """(the epoch's shard order, the seed of its shuffle buffer), from (seed, rank, epoch)."""
        rng = np.random.default_rng((self.plan.rank_seed, epoch))
        order = self.shards[rng.permutation(len(self.shards))]
        return order, int(rng.integers(2**31))

    TASK_POSITIVES = 262_144
    """Consecutive (epoch, shard) units share a task up to this many positives (a larger shard has
    a task of its own). A task costs Ray Data about 0.1 s on 2 cores whatever its size: at ML-100K
    (about 20,000 positives a shard, 40,000 a rank's epoch) the tasks, not the rows, set the
    pipeline's pace, and a task a rank's epoch kept a Ray worker busy beside the trainer for as
    long as training ran."""

    def tasks(self, first_epoch: int, last_epoch: int) -> list[dict[str, str]]:
        """The pipeline's task items for epochs first..last (see SampledShard)."""
        units: list[tuple[int, int]] = []
        for epoch in range(first_epoch, last_epoch + 1):
            units += [(epoch, int(shard)) for shard in self._order(epoch)[0]]
        positives = [self.shard_positives[shard] for _, shard in units]
        return [{"units": group} for group in group_units(units, positives, self.TASK_POSITIVES)]

    def pipeline(self, first_epoch: int, last_epoch: int) -> ray.data.Dataset:
        """One lazy dataset for epochs first..last: tasks of whole shards in each epoch's seeded order,
        epoch after epoch (a task may end one epoch and begin the next); blocks come back in that
        order."""
        tasks = self.tasks(first_epoch, last_epoch)
        shard_task = SampledShard(self.sampler, self.plan.rank_seed, self.plan.stripe, self.files, self.block_rows)
        # One shard task at a time per rank (a task pool of one). A task that Ray pauses because its
        # blocks wait unread keeps its CPU, and the ranks' pipelines share the cluster's free CPUs:
        # one rank's paused tasks could hold them all, and the other rank's task wait for a CPU for
        # ever while the first rank waited for that rank in a collective. (That hung a whole 100M
        # epoch after 800 steps, both free half-CPUs held by one rank's tasks.) The next task starts
        # as soon as one ends; the blocks already made cover its shard's read. No object-store cap
        # either: Ray Data's default budget holds the task back (with a cap and several tasks, a
        # later task's blocks, waiting for the task before them, filled it, and the pipeline stopped).
        dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            shard_task, batch_size=1, batch_format="numpy", num_cpus=SHARD_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=1))
        context = dataset.context
        context.execution_options.preserve_order = True  # blocks in the seeded (epoch, shard) order
        context.enable_progress_bars = False
        # Each block the task yields goes out on its own. Left at Ray Data's default (128 MB), a task's
        # blocks were joined into 128 MB ones: the first came out only when most of a 100M dataset's
        # shard was sampled, so the task was never held back by its consumer (Ray pauses a task two
        # of *those* blocks ahead), and the ranks' tasks sampled whole shards in bursts beside
        # training, which slowed the steps at every shard boundary. A whole block is above 0.8 of
        # the target, and below the 1.5 times of it at which Ray Data would cut a block.
        context.target_max_block_size = int(0.8 * shard_task.block_bytes())
        pace_idle_executors(context)  # the executor thread shares the trainer's process
        return dataset

    DRAIN_ROWS = 2_000_000
    """An epoch left with at most this many rows unread is read to its end before the next epoch;
    with more (a bounded epoch of a large dataset), the pipeline starts again at the next epoch."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, from the run's pipeline when it is at this epoch (it started
        with the first epoch asked for and runs to `last_epoch`, Ray Data working ahead of the
        trainer, through evaluations and into the next epoch), else from a new pipeline. No
        pipeline starts before the first call, so nothing is read while the model is being built:
        TorchScript compiles FBGEMM's helpers then, and CPython 3.11.7 can fail ("AST constructor
        recursion depth mismatch") when another thread compiles at the same time, which Ray Data's
        threads do."""
        blocks = self._blocks
        if blocks is not None and blocks.epoch == epoch - 1 and 0 < blocks.unread <= self.DRAIN_ROWS:
            blocks.finish_epoch()  # the last batches the ranks agreed to leave out (or a bounded epoch's rest)
        if blocks is None or blocks.epoch != epoch - 1 or blocks.unread or epoch > blocks.last_epoch:
            self.close()
            last = max(epoch, self.last_epoch or epoch)
            dataset = self.pipeline(epoch, last)
            self._blocks = blocks = _EpochBlocks(
                dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2), epoch - 1, last)
        _, shuffle_seed = self._order(epoch)
        return shuffled_batches(blocks.next_epoch(self.epoch_rows()), self.batch_size, self.shuffle_buffer, shuffle_seed)


class _EpochBlocks:
    """The blocks of a pipeline over consecutive epochs, handed out an epoch at a time: an epoch's
    rows are the next ones, up to its row count. Ray Data may join the blocks a task yields (a
    shard's last, short block with the next shard's first), so a task that ends one epoch and
    begins the next can return a block holding both: it is cut where the epoch ends, and the rest
    opens the next epoch."""

    def __init__(self, blocks: Iterable[Batch], before_first: int, last_epoch: int) -> None:
        self.blocks, self.epoch, self.last_epoch = iter(blocks), before_first, last_epoch
        self.unread = 0
        """Rows of `epoch` not yet handed out."""
        self.carried: Batch | None = None
        """The rows of a block past the end of `epoch`: the next epoch's first."""

    def next_epoch(self, rows: int) -> Iterator[Batch]:
        """Move to the next epoch, of `rows` rows, and return its blocks (read as iterated)."""
        if self.unread:
            raise RuntimeError(f"epoch {self.epoch + 1} asked for before epoch {self.epoch} was read")
        self.epoch += 1
        self.unread = rows
        return self._read()

    def finish_epoch(self) -> None:
        """Read and drop what is left of the current epoch (the trainer stopped it early)."""
        for _ in self._read():
            pass

    def _read(self) -> Iterator[Batch]:
        while self.unread > 0:
            block, self.carried = self.carried, None
            if block is None:
                block = next(self.blocks, None)
            if block is None:
                raise RuntimeError(f"the Ray Data pipeline ended {self.unread} rows short of epoch {self.epoch}'s end")
            size = len(next(iter(block.values())))
            if size > self.unread:
                if self.epoch == self.last_epoch:
                    raise RuntimeError(f"the Ray Data pipeline holds more rows than its last epoch, {self.epoch}: "
                                       "its rows do not match the epochs' counts")
                block, self.carried = ({name: values[: self.unread] for name, values in block.items()},
                                       {name: values[self.unread :] for name, values in block.items()})
                size = self.unread
            self.unread -= size
            yield block

    def close(self) -> None:
        self.carried = None
        close = getattr(self.blocks, "close", None)
        if close is not None:
            close()
