"""Every use of a private Ray API, in one place: what to check when Ray is upgraded.

1. IdleLoopPause: pauses for Ray Data's scheduling loop when it has nothing to do, through Ray
   Data's internal ExecutionCallback hook and a look at its executor's output queue.

   Ray Data's streaming executor (Ray 2.5x) loops without waiting once its tasks' outputs wait for a
   slower consumer: a streaming task that Ray holds back (its output is not taken) still counts as
   ready, so `ray.wait` returns at once, and so does every step. In a trainer that consumer is the
   training step, so the executor's thread, inside the trainer's process and bound to the rank's
   CPU, would spin for most of the run and take as much CPU as training. This callback sleeps after
   each step while a block already waits for the consumer (until the consumer takes it, at most
   FED_PAUSE_S), and briefly after a step that took no time otherwise (a new block or task must not
   start late when the consumer has nothing).

2. RankTrainer: Ray Train's TorchTrainer without the helper actors a shardrec run has no use for,
   by filtering Ray Train's private `_create_default_callbacks`; and whose SIGINT handler (installed
   by Ray Train's private `_register_sigint_handler`) also calls the driver's own.

   Ray Train starts each helper of its default callbacks as an actor, a new Python process that
   imports Ray (more than a second of CPU each), while the ranks import torch and TorchRec on the
   same cores, so each one delays the first step. Two of them do nothing here:
   - the dataset manager (DatasetsCallback) serves the shards of datasets handed to the trainer;
     shardrec hands none (each rank runs its own Ray Data pipeline, `cluster.rank_stream`);
   - the placement-group cleaner (PlacementGroupCleanerCallback), a detached actor that removes the
     run's placement group should the controller die, matters on a long-lived cluster, but an
     embedded cluster is stopped, placement groups and all, when its driver ends.

   The callbacks are picked out by class name through `_create_default_callbacks`, Ray Train's own
   (private) list: a Ray that renames either keeps it, which only costs the time again.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable

import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.train.torch import TorchTrainer


class IdleLoopPause(ExecutionCallback):
    FAST_STEP_S = 0.001
    """A scheduling step shorter than this waited for nothing: no task output could be taken."""
    PAUSE_S = 0.005
    """Sleep after such a step while the consumer has no block waiting (a new task or block starts at
    most this late once the consumer frees room)."""
    FED_PAUSE_S = 0.2
    """Sleep after any step while a block waits for the consumer, up to this long. The consumer
    already holds two more blocks (`prefetch_batches`) besides the one waiting, each hundreds of
    milliseconds of training (262,144 rows at about a million samples a second on 2 CPU ranks), so
    nothing is late at this pace, and a scheduling step (about a millisecond of Python) runs a few
    times a second at most."""
    FED_SLICE_S = 0.02
    """The pause while fed ends this soon after the consumer takes the waiting block (a look at the
    queue's length, no Ray call)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Ray Data makes it with no arguments; tests hand it a clock of their own."""
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def on_execution_step(self, executor: object) -> None:
        now = self._clock()
        # Whatever the step's length while a block waits: a step that the training thread held the
        # GIL through looks long, yet it waited for nothing.
        if blocks_waiting(executor):
            # In slices, looking at the queue alone (no Ray call): a consumer that takes its block
            # sooner (a fast reader, not a training step) finds the next one at most a slice late.
            until = now + self.FED_PAUSE_S
            while True:  # the block was just seen waiting: the first slice needs no second look
                self._sleep(self.FED_SLICE_S)
                now = self._clock()
                if now >= until or not blocks_waiting(executor):
                    break
        elif now - self._last < self.FAST_STEP_S:
            self._sleep(self.PAUSE_S)
            now = self._clock()
        self._last = now


def blocks_waiting(executor: object) -> int:
    """Blocks in the executor's output queue, not yet taken by its consumer; 0 where this Ray's
    executor does not expose them (then only the short pause applies)."""
    output_node = getattr(executor, "_output_node", None)
    if output_node is None:
        return 0
    try:
        return len(output_node[1].output_queue)
    except (AttributeError, IndexError, TypeError):
        return 0


def pace_idle_executors(context: ray.data.DataContext | None = None) -> None:
    """Add the pauses to `context` (default: this process's current one), once."""
    context = context or ray.data.DataContext.get_current()
    if IdleLoopPause not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleLoopPause)


UNUSED_WITHOUT_DATASETS = "DatasetsCallback"
UNUSED_ON_EMBEDDED_CLUSTER = "PlacementGroupCleanerCallback"


class RankTrainer(TorchTrainer):
    """A TorchTrainer for shardrec's ranks: no `datasets`; `embedded` says the cluster ends with the
    driver (see the module docstring)."""

    def __init__(self, *args: Any, embedded: bool, **kwargs: Any) -> None:
        if kwargs.get("datasets"):
            raise ValueError("shardrec's ranks read their own shards; RankTrainer takes no datasets")
        self.unused_callbacks = {UNUSED_WITHOUT_DATASETS} | ({UNUSED_ON_EMBEDDED_CLUSTER} if embedded else set())
        super().__init__(*args, **kwargs)

    def _register_sigint_handler(self, controller: Any) -> None:
        """Ray Train's own SIGINT handler (it asks the run's controller to abort), then the handler the
        driver had before `fit`: Ray Train's replaced it, and the driver's is what stops an embedded
        cluster and says where the run can be resumed from."""
        before = signal.getsignal(signal.SIGINT)
        super()._register_sigint_handler(controller)
        ray_train = signal.getsignal(signal.SIGINT)
        if not (callable(before) and callable(ray_train)) or before is signal.default_int_handler:
            return

        def both(signum: int, frame: Any) -> None:
            try:
                ray_train(signum, frame)
            finally:
                before(signum, frame)

        signal.signal(signal.SIGINT, both)

    def _create_default_callbacks(self) -> list[Any]:
        return [callback for callback in super()._create_default_callbacks()
                if type(callback).__name__ not in self.unused_callbacks]
