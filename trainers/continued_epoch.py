"""The rest of an epoch that another world size had started: world-independent data progress.

A checkpoint taken inside an epoch records `k` batches done by each of the W ranks that wrote it.
Each of those ranks' streams is a function of (seed, epoch, rank, W), so any process can replay it:
the batches still to train are batches k..n-1 of the W old streams (n: the steps per rank the old
world agreed on, recomputed from the same announced counts). `ContinuedEpoch` deals those R =
W(n - k) batches to the M new ranks so that every rank takes the same number of steps (TorchRec's
collectives require it) and each remaining row is trained once:

- the first L = R mod M of them (in order: old stream 0 first) are pooled and cut into M equal
  smaller batches, one per rank, taken as every rank's first step; the fewer than M rows that do
  not divide are left out (negatives first, where the batch has labels);
- the other R - L are dealt in M equal consecutive ranges.

A new rank replays only the old streams its share touches (from their start: a stream cannot seek),
one after another. The same (user, item) rows as the uninterrupted epoch are trained, with the same
negatives; the steps group them differently, so the weights agree with an uninterrupted run within
training noise rather than bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import numpy as np

from core.rank_plan import RankPlan
from trainers.batches import Batch, BatchSource

SourceFor = Callable[[RankPlan], BatchSource]
"""A rank's batch source for any RankPlan (the same kind of source the run trains with)."""


class ContinuedEpoch:
    """This rank's share of the rest of `epoch`, begun by `old_world` ranks that each trained `done`
    batches. A BatchSource for that one epoch."""

    independent_epochs = False  # one epoch only: nothing to read ahead into

    def __init__(self, source_for: SourceFor, old_world: int, done: int, epoch: int, rank: int, world: int,
                 num_shards: int, seed: int, batch_size: int, max_steps: int = 0) -> None:
        self.epoch_number, self.rank, self.world, self.batch_size = epoch, rank, world, batch_size
        self.old_world, self._source_for = old_world, source_for
        self._plans = [RankPlan(old_rank, old_world, num_shards, seed) for old_rank in range(old_world)]
        # Made one at a time and let go: a sequence source holds its shards' windows, and this rank
        # reads only the streams its share touches (made again in `epoch`).
        counts = []
        for plan in self._plans:
            source = source_for(plan)
            counts.append(source.batches_in_epoch(epoch))
            source.close()
        if any(count is None for count in counts):
            raise RuntimeError("an epoch continues on another world size only from sources that count their batches")
        agreed = min(counts)
        if max_steps:
            agreed = min(agreed, max_steps)
        self.done = min(done, agreed)
        left = [(old_rank, index) for old_rank in range(old_world) for index in range(self.done, agreed)]
        self.pooled = left[:len(left) % world]
        """Batches cut into one smaller batch per rank (fewer than `world`)."""
        share = (len(left) - len(self.pooled)) // world
        self.mine = left[len(self.pooled) + rank * share:len(self.pooled) + (rank + 1) * share]
        self.remaining_batches = len(left)

    def describe(self) -> str:
        dropped = len(self.pooled) * self.batch_size % self.world
        return (f"{self.remaining_batches} batches of the {self.old_world} old ranks' streams were left; this world "
                f"of {self.world} trains them in {self.batches_in_epoch(self.epoch_number)} steps"
                + (f", leaving out {dropped} row(s) that do not divide among the ranks" if dropped else ""))

    def batches_in_epoch(self, epoch: int) -> int:
        pooled_rows_each = len(self.pooled) * self.batch_size // self.world
        return len(self.mine) + (1 if pooled_rows_each else 0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if epoch != self.epoch_number:
            raise ValueError(f"this source continues epoch {self.epoch_number} only, not {epoch}")
        wanted = self.pooled + self.mine
        by_stream: dict[int, list[int]] = {}
        for old_rank, index in wanted:
            by_stream.setdefault(old_rank, []).append(index)
        pooled = set(self.pooled)
        held: list[Batch] = []
        first_yielded = not self.pooled
        for old_rank in sorted(by_stream):
            indices = set(by_stream[old_rank])
            source = self._source_for(self._plans[old_rank])
            stream = source.epoch(epoch)
            try:
                for index, batch in enumerate(itertools.islice(stream, max(indices) + 1)):
                    if index not in indices:
                        continue
                    if (old_rank, index) in pooled:
                        held.append(batch)
                        if len(held) == len(self.pooled):
                            if self.batches_in_epoch(epoch) > len(self.mine):  # not when no row is left for each
                                yield self._my_cut(held)
                            held, first_yielded = [], True
                        continue
                    if not first_yielded:  # the pooled batches come first in the global order
                        raise RuntimeError("the pooled batches were not all found before this rank's own")
                    yield batch
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
                source.close()

    def _my_cut(self, held: list[Batch]) -> Batch:
        """This rank's equal part of the pooled batches' rows (the rows that do not divide left out,
        label-0 rows first)."""
        rows = {name: np.concatenate([batch[name] for batch in held]) for name in held[0]}
        total = len(next(iter(rows.values())))
        each = total // self.world
        keep = np.arange(total)
        extra = total - each * self.world
        if extra:
            labels = rows.get("label")
            negatives = np.flatnonzero(labels == 0) if labels is not None else np.empty(0, dtype=np.int64)
            dropped = negatives[-extra:] if len(negatives) >= extra else np.arange(total - extra, total)
            keep = np.setdiff1d(keep, dropped)
        part = keep[self.rank * each:(self.rank + 1) * each]
        return {name: values[part] for name, values in rows.items()}

    def close(self) -> None:
        """Each old stream's source is closed once read (see `epoch`)."""
