"""The Ray Data training stream of one rank: a pure function of (seed, epoch, rank) and the dataset.

Each Ray Train worker runs its own Ray Data pipeline over its own train shards (dealt by
`trainers.batches.rank_shards`, as the torchrun ranks' are): one Ray task per shard, in an order drawn from (seed, epoch), reads the shard,
shuffles it and draws its negatives with a generator seeded by (seed, epoch, shard), against the
shard's own positives (shards are user-partitioned). The blocks come back in that order
(`preserve_order`) and are batched through a local shuffle buffer with a seed of its own. So the
epoch's batches are the same on every run, and a resumed epoch that skips the batches already
trained continues with exactly the rows that were not (exactly-once positives, as under torchrun).
Ray Data still runs the reads and the sampling in parallel tasks, ahead of the training step.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import ray.data

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from cluster.shard_sampling import SampledShard
from trainers.batches import Batch, rank_rows, rank_shards, shuffled_batches
from trainers.prefetch import Prefetcher


class RayRankStream:
    """A BatchSource for one Ray Train worker (see the module docstring)."""

    def __init__(self, dataset: PreparedDataset, sampler: NegativeSampler, batch_size: int, shuffle_buffer: int,
                 rank: int, world_size: int, seed: int, last_epoch: int | None = None) -> None:
        self.shards, self.striped = rank_shards(dataset.num_shards, rank, world_size)
        self.files = {int(shard): str(dataset.shard_file("train", int(shard))) for shard in self.shards}
        shard_rows = np.asarray(dataset.shard_rows("train"), dtype=np.int64)[self.shards]
        self.rows = rank_rows(shard_rows, rank, world_size, self.striped)
        """Positive rows this rank trains on per epoch."""
        self.sampler = sampler
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.seed = seed + 1000 * rank
        self.last_epoch = last_epoch
        """No epoch after this one is read ahead (None: always read the next one ahead)."""
        self._ahead: tuple[int, Prefetcher[Batch, Batch]] | None = None

    def batches_in_epoch(self, epoch: int) -> int:
        """Whole batches an epoch yields (shuffled_batches drops the last partial one)."""
        return self.sampler.expanded_rows(self.rows) // self.batch_size

    def close(self) -> None:
        """Stop reading ahead (the trainer calls this when training ends)."""
        if self._ahead is not None:
            self._ahead[1].close()
            self._ahead = None

    def pipeline(self, epoch: int) -> tuple[ray.data.Dataset, int]:
        """This epoch's dataset (lazy) and the seed of its local shuffle."""
        rng = np.random.default_rng((self.seed, epoch))
        order = self.shards[rng.permutation(len(self.shards))]
        tasks = [{"path": self.files[int(shard)], "shard": int(shard)} for shard in order]
        stripe = (self.rank, self.world_size) if self.striped else None
        dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            SampledShard(self.sampler, self.seed, epoch, stripe), batch_size=1, batch_format="numpy")
        dataset.context.execution_options.preserve_order = True  # blocks in the seeded shard order
        dataset.context.enable_progress_bars = False
        return dataset, int(rng.integers(2**31))

    AHEAD_BATCHES = 4
    """Batches of the next epoch read while this one finishes (and while it is evaluated)."""

    def _batches(self, epoch: int) -> Iterator[Batch]:
        dataset, shuffle_seed = self.pipeline(epoch)
        # Whole blocks out of Ray Data (no copy, no per-batch assembly), cut and mixed here.
        blocks = dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        return shuffled_batches(blocks, self.batch_size, self.shuffle_buffer, shuffle_seed)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches. As the epoch starts, the next epoch's pipeline starts too and reads
        its first batches: a new pipeline's first block takes a scheduling round trip and a shard's
        read and sampling, which an epoch of a few dozen steps would otherwise wait for. The
        batches are the same either way (the pipeline is a function of seed and epoch).

        Nothing is read ahead while the model is being built: TorchScript compiles FBGEMM's helpers
        then, and CPython 3.11.7 can fail ("AST constructor recursion depth mismatch") when another
        thread compiles at the same time, which Ray Data's threads do."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch:
            batches: Iterator[Batch] = iter(ahead[1])
        else:
            if ahead is not None:
                ahead[1].close()
            batches = self._batches(epoch)
        if self.last_epoch is None or epoch < self.last_epoch:
            self._ahead = (epoch + 1, Prefetcher(self._batches(epoch + 1), lambda batch: batch, depth=self.AHEAD_BATCHES))
        yield from batches
