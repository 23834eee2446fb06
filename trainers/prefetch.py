"""Batches prepared ahead of the training step, in a background thread.

Reading Parquet, drawing negatives, slicing, checking ids and building the step's tensors (pinned
and copied without blocking on a GPU) all run while the previous step computes: numpy, pyarrow and
torch release the GIL in their kernels, so the step waits only when the data path is slower than
the model. The thread runs no collective: agreement between ranks stays on the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[Item, Prepared]):
    """Iterate `prepare(item)` for each item of `items`, up to `depth` items ahead.

    An exception in the source or in `prepare` is raised by the consumer at the item where it
    happened. `close()` (or leaving a `with` block) stops the thread even when the consumer stops
    early, e.g. at trainer.max_steps_per_epoch.
    """

    def __init__(self, items: Iterator[Item], prepare: Callable[[Item], Prepared], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._items, self._prepare = items, prepare
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="shardrec-prefetch", daemon=True)
        self._thread.start()

    def _put(self, value: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put(self._prepare(item)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))
            return
        finally:
            # A source stopped early is closed here, while what it reads from (a Ray Data pipeline)
            # still exists, rather than whenever it is garbage-collected.
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        self._put(_END)

    def __iter__(self) -> Iterator[Prepared]:
        while True:
            value = self._queue.get()
            if value is _END:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> "Prefetcher[Item, Prepared]":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
