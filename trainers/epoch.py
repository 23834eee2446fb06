"""One epoch's batches, ready for the step: everything around the step that is not the step.

`EpochBatches` is what `Trainer.fit` iterates with `train_step`. It owns
- resume: the batches a mid-epoch checkpoint had trained are skipped (an epoch's order is a
  function of (seed, rank, epoch), so the next batch is the first unseen one);
- agreement: every rank runs the same number of steps (TorchRec's collectives hang otherwise):
  the smallest announced count over the ranks, agreed once, or a per-step vote (`lockstep`) for a
  source that cannot count;
- preparation ahead of the step (`Prefetcher`) and the next epoch's read-ahead, started during this
  epoch's last steps so its first batch is ready when it begins (`ReadAhead`);
- after each step (`stepped`): a checkpoint every trainer.checkpoint_every_steps (one due at the
  epoch's last step is left to the epoch's own checkpoint), and the batch recorder of the fault
  tests (trainers/fault_hooks.py);
- the time the step waited for data, and a source that ends before the count it announced.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from trainers.batches import Batch, BatchSource, lockstep
from trainers.distributed import all_min
from trainers.fault_hooks import BatchRecorder
from trainers.prefetch import Prefetcher

Prepare = Callable[[Batch], Any]
"""A batch -> (the batch, what the step consumes); runs in the prefetch thread."""


class ReadAhead:
    """At most one next epoch's prefetcher, started before that epoch begins."""

    def __init__(self) -> None:
        self._ahead: tuple[int, Prefetcher] | None = None

    def start(self, epoch: int, batches: Iterator[Batch], prepare: Prepare, depth: int) -> None:
        self.take(None)
        self._ahead = (epoch, Prefetcher(batches, prepare, depth=depth))

    def take(self, epoch: int | None) -> Prefetcher | None:
        """The prefetcher started for `epoch`, if any; one for another epoch (every one, for None)
        is stopped."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead[0] != epoch:
            ahead[1].close()
            return None
        return ahead[1]


@dataclass
class EpochPlan:
    """The settings an epoch's batches follow (trainer section, resolved by the Trainer)."""

    epoch: int
    skip: int
    """Batches a mid-epoch checkpoint had trained."""
    max_steps: int = 0
    """trainer.max_steps_per_epoch (0: whole epochs)."""
    depth: int = 2
    """trainer.prefetch_batches."""
    checkpoint_every_steps: int = 0
    needs_count: bool = False
    """The step pulls batches ahead itself (TorchRec's pipeline): the count must be agreed up front."""


class EpochBatches:
    """Iterate the prepared batches of one epoch (see the module docstring). Collective: every rank
    makes one per epoch, with the same plan; use it as a context manager so its threads stop."""

    def __init__(self, source: BatchSource, plan: EpochPlan, prepare: Prepare, read_ahead: ReadAhead,
                 rank: int, last_epoch: int, checkpoint: Callable[[], None] | None = None) -> None:
        self.plan = plan
        self._source_batches = source.epoch(plan.epoch)
        announced = source.batches_in_epoch(plan.epoch)
        self.remaining: int | None = None
        """Steps this epoch will run on every rank (None: decided step by step)."""
        if announced is not None:
            total = all_min(announced)  # every rank runs the shortest rank's count
            if plan.max_steps:
                total = min(total, plan.max_steps)
            self.remaining = max(total - plan.skip, 0)
        elif plan.needs_count:
            raise RuntimeError("TorchRec's train pipeline needs a batch source that announces its batch count "
                               "(BatchSource.batches_in_epoch); use trainer.train_pipeline = 'plain'")
        end = None if self.remaining is None else plan.skip + self.remaining
        batches = itertools.islice(self._source_batches, plan.skip, end)
        ahead = read_ahead.take(plan.epoch)
        if ahead is not None and (plan.skip or self.remaining is None):  # not an epoch read ahead can serve
            ahead.close()
            ahead = None
        self._prefetcher = ahead or Prefetcher(batches, prepare, depth=plan.depth)
        if self.remaining is None:
            limit = max(plan.max_steps - plan.skip, 1) if plan.max_steps else 0
            self._items: Iterator[Any] = iter(lockstep(self._prefetcher, limit))
        elif ahead is not None:  # it read its source whole: the agreed count is cut here
            self._items = itertools.islice(self._prefetcher, self.remaining)
        else:
            self._items = iter(self._prefetcher)
        self._upcoming = (lambda: source.epoch(plan.epoch + 1)) if source.independent_epochs and plan.epoch < last_epoch else None
        self._prepare, self._read_ahead = prepare, read_ahead
        self._checkpoint = checkpoint
        self._recorder = BatchRecorder.from_environment(rank)
        self.steps = 0
        """Steps taken in this epoch by this iterator (after the skipped ones)."""
        self.waited_s = 0.0
        """Seconds spent waiting for prepared batches."""
        self.checkpoint_at_end = False
        """A step checkpoint fell on the epoch's last step: the epoch's own checkpoint, taken after
        its evaluation, stands for it (a step checkpoint there would resume into an epoch with
        nothing left to train, and record that epoch twice)."""

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        asked = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.waited_s += time.perf_counter() - asked

    def stepped(self, step: int, batch: Batch) -> None:
        """After each optimizer step (`step`: steps of the run so far), on the step's `batch`."""
        self.steps += 1
        if self._recorder is not None:
            self._recorder.record(step, batch)
        every = self.plan.checkpoint_every_steps
        if every and self._checkpoint is not None and step % every == 0:
            if self.remaining is not None and self.steps == self.remaining:
                self.checkpoint_at_end = True
            else:
                self._checkpoint()
        if self._upcoming is not None and self.remaining is not None and self.steps == max(self.remaining - self.plan.depth, 1):
            # `depth` steps before the end this epoch's batches are all prepared or queued: the
            # next epoch's preparation overlaps the last steps instead of its first.
            self._read_ahead.start(self.plan.epoch + 1, self._upcoming(), self._prepare, self.plan.depth)

    def finish(self) -> None:
        """At the end of the epoch's steps: refuse a source that gave fewer batches than announced."""
        if self.remaining is not None and self.steps < self.remaining:
            # The other ranks are now waiting in a step's collective. Failing here ends the job (the
            # launchers stop every rank).
            raise RuntimeError(f"the epoch's batch source ended after {self.steps} of the {self.remaining} "
                               "batches it announced")

    def close(self) -> None:
        self._prefetcher.close()
        close = getattr(self._source_batches, "close", None)
        if close is not None:  # a generator left before its end (a step limit) releases what it reads now
            close()

    def __enter__(self) -> "EpochBatches":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
