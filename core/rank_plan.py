"""What one rank of a data-parallel job reads, trains, evaluates and seeds: decided here only.

Every prepared dataset is partitioned by user into `num_shards` shards. Training and evaluation
split those shards between the ranks by two rules, both owned by `RankPlan`:

- Training must give every rank the same amount of work (the ranks step in lockstep). When the
  shards divide evenly, rank r trains shards r, r + world, ...; otherwise every rank reads every
  shard and trains its stripe, rows r, r + world, ... of each ("striped").
- Evaluation and per-user model data must give each user to exactly one rank, and a rank must
  hold all of its users' rows: rank r owns the users of shards r, r + world, ... whether or not
  training stripes (some ranks may own one shard more; evaluation pads its collectives).

Seeds: draws shared by all ranks (a striped epoch's order, the evaluation's user sample) use
`seed`; draws of a rank's own (its epoch order, its negatives) use `rank_seed`, which every batch
source takes from here, so that exactly-once resume sees the same draws on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Columns = dict[str, np.ndarray]

RANK_SEED_STRIDE = 1000
"""rank_seed = seed + RANK_SEED_STRIDE * rank: distinct per rank for any seed below the stride."""


@dataclass(frozen=True)
class RankPlan:
    rank: int
    world_size: int
    num_shards: int
    seed: int = 0
    """The run's seed (trainer.seed)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.num_shards < 1:
            raise ValueError("a dataset has at least one shard")

    @property
    def striped(self) -> bool:
        """Whether every rank reads every train shard and keeps its stripe of rows."""
        return self.num_shards % self.world_size != 0

    @property
    def train_shards(self) -> np.ndarray:
        """Train shards this rank reads (all of them when striped)."""
        shards = np.arange(self.num_shards)
        return shards if self.striped else shards[self.rank :: self.world_size]

    @property
    def user_shards(self) -> list[int]:
        """Shards whose users this rank evaluates and holds per-user model data for."""
        return list(range(self.rank, self.num_shards, self.world_size))

    @property
    def stripe(self) -> tuple[int, int] | None:
        """(rank, world) when striped, else None: what a task that cannot import this needs."""
        return (self.rank, self.world_size) if self.striped else None

    def take(self, values: np.ndarray) -> np.ndarray:
        """This rank's stripe of `values` (all of them unless striped)."""
        return values[self.rank :: self.world_size] if self.striped else values

    def mine(self, columns: Columns) -> Columns:
        """This rank's rows of one train shard's columns (all of them unless striped)."""
        return {name: self.take(values) for name, values in columns.items()}

    def rows_of(self, shard_rows: int) -> int:
        """How many of a train shard's `shard_rows` rows this rank trains."""
        return len(range(self.rank, shard_rows, self.world_size)) if self.striped else shard_rows

    def train_rows(self, shard_rows: np.ndarray) -> int:
        """Positive rows this rank trains per epoch, from the row counts of its `train_shards`."""
        return int(sum(self.rows_of(int(n)) for n in shard_rows))

    @property
    def rank_seed(self) -> int:
        """Seed of this rank's own draws (epoch order, negatives)."""
        return self.seed + RANK_SEED_STRIDE * self.rank
