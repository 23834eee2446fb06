"""The Ray Data map of the training stream (cluster/rank_stream.py): a task's train shards -> their
positives, shuffled, with their sampled negatives. Its own module, importing numpy, pyarrow and
the sampler only: Ray Data's task workers import it, and importing torch with it (as the stream's
module does) cost each new task worker more than a second before its first block."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.negatives import NegativeSampler, with_negatives


SHARD_TASK_CPUS = 0.5
"""Ray CPU resource of a shard task. Half a CPU: with whole-CPU tasks, the 2-core machine's one free
CPU ran one rank's shard task at a time while the other rank's pipeline waited. Every rank runs one shard task at a time (RayRankStream.pipeline), so a cluster needs
this much CPU per rank beside its workers' own (`cluster.launch.check_task_cpus`)."""


class SampledShard:
    """Ray Data map: one task item {"units"} -> for each of its (epoch, shard) units in turn
    ("epoch:shard" joined by commas, in the run's order), the shard's (or this rank's stripe of its)
    positives, shuffled, with their sampled negatives; every draw from (seed, epoch, shard). A
    task's output is the concatenation of its units' outputs, and no block it yields holds rows of
    two units, so grouping units into tasks changes no row. (Where Ray Data joins or cuts a task's
    blocks does not matter either: the stream cuts blocks at each epoch's end, and its shuffle takes
    rows in chunks of a fixed size, whatever the blocks.)

    The blocks are Arrow tables, not dicts of numpy arrays. Ray Data (2.60) turns a dict into a
    table column by column after asking `pyarrow.infer_type` for each column's type, which walks
    every element as a Python object: about 24 ms for a column of 262,144 rows here, against under
    0.1 ms to wrap the same array. That inference was three quarters of a task worker's samples
    (py-spy), and the task workers are not bound to a rank's CPUs: they took CPU from the ranks."""

    BLOCK_ROWS = 262_144
    """Rows per output block, at most (about 5 MB): each block is one slice of the shard's shuffled
    positives with their negatives."""

    def __init__(self, sampler: NegativeSampler, seed: int, stripe: tuple[int, int] | None,
                 files: dict[int, str], block_rows: int = BLOCK_ROWS) -> None:
        self.sampler, self.seed, self.stripe, self.files = sampler, seed, stripe, files
        self.positives_per_block = max(1, block_rows // sampler.expanded_rows(1))

    def block_bytes(self) -> int:
        """Bytes of a whole block (a shard's last one is shorter)."""
        # The columns' widths from expanding no positive at all (no draw, no redraw counted)
        none = {"user_id": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64)}
        row_bytes = sum(values.itemsize for values in self.sampler(none, np.random.default_rng(0)).values())
        return self.sampler.expanded_rows(self.positives_per_block) * row_bytes

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        (units,) = batch["units"]
        for epoch, shard in parse_units(str(units)):
            yield from self.shard_blocks(epoch, shard)

    def shard_blocks(self, epoch: int, shard: int) -> Iterator[pa.Table]:
        rng = np.random.default_rng((self.seed, epoch, shard))
        table = pq.read_table(self.files[shard], columns=["user_id", "item_id"])
        positives = {name: table.column(name).to_numpy() for name in ("user_id", "item_id")}
        known = self.sampler.known_keys(positives) if self.sampler.reject_positives else None
        mine = positives
        if self.stripe is not None:
            rank, world = self.stripe
            mine = {name: values[rank::world] for name, values in positives.items()}
        order = rng.permutation(len(mine["user_id"]))
        # Negatives are drawn a block's worth of positives at a time (as ParquetFilesSource does under
        # torchrun), and each block is yielded as soon as it is drawn: the task never holds its
        # shard's expanded rows (about 140 MB at 100M interactions), only one block of them, and the
        # rank's pipeline passes each block on as it is (RayRankStream.pipeline): Ray pauses the
        # task while its blocks wait unread, so it samples at its trainer's pace.
        for first in range(0, len(order), self.positives_per_block):
            index = order[first : first + self.positives_per_block]
            expanded = with_negatives(self.sampler, {name: values[index] for name, values in mine.items()}, rng, known)
            yield pa.table(expanded)


def group_units(units: list[tuple[int, int]], positives: list[int], task_positives: int) -> list[str]:
    """Consecutive (epoch, shard) units grouped into tasks of at most `task_positives` positive rows
    (a larger unit alone), each as a task item's "epoch:shard,..." string. `positives[i]` is the
    rows units[i] gives this rank. Units of consecutive epochs share a task like those of one
    epoch: at ML-100K size a rank's whole epoch is a fraction of one task's worth."""
    groups: list[list[str]] = []
    total = 0
    for (epoch, shard), rows in zip(units, positives):
        if not groups or total + rows > task_positives:
            groups.append([])
            total = 0
        groups[-1].append(f"{epoch}:{shard}")
        total += rows
    return [",".join(group) for group in groups]


def parse_units(item: str) -> list[tuple[int, int]]:
    """A task item's "epoch:shard,..." -> [(epoch, shard), ...]."""
    return [(int(epoch), int(shard)) for epoch, _, shard in (unit.partition(":") for unit in item.split(","))]
