"""How long Ray Data's executor pauses between scheduling steps (cluster/ray_data_pacing.py), by
what its output queue holds. The executor here is a stand-in holding only that queue: the pause
reads nothing else. (A test on a real pipeline depended on Ray Data's block sizes at the time: in
one run of the suite blocks rarely waited for the reader, so it could not check the pause.)"""

from __future__ import annotations

import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest

from cluster.ray_data_pacing import IdleLoopPause, blocks_waiting

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def executor_with(queue: deque) -> SimpleNamespace:
    """What the pause reads of Ray Data's StreamingExecutor: its output node's (operator, state)."""
    return SimpleNamespace(_output_node=(None, SimpleNamespace(output_queue=queue)))


def pause_length(pause: IdleLoopPause, executor: object, step_s: float = 0.0) -> float:
    """Seconds `pause` sleeps after a scheduling step that took `step_s`."""
    pause._last = time.perf_counter() - step_s
    began = time.perf_counter()
    pause.on_execution_step(executor)
    return time.perf_counter() - began


def test_a_waiting_block_holds_the_executor_until_the_reader_takes_it():
    pause = IdleLoopPause()
    pause.FED_PAUSE_S = 0.3
    assert pause_length(pause, executor_with(deque(["block"]))) >= 0.3  # a slow reader: the whole pause

    queue = deque(["block"])
    taker = threading.Timer(0.03, queue.popleft)  # a reader that takes its block after 30 ms
    taker.start()
    length = pause_length(pause, executor_with(queue))
    taker.join()
    assert 0.03 <= length < 0.15, length  # ends within a slice or so of the take, not at 0.3 s


def test_without_a_waiting_block_only_a_step_that_took_no_time_is_followed_by_the_short_pause():
    pause, empty = IdleLoopPause(), executor_with(deque())
    assert pause.PAUSE_S <= pause_length(pause, empty, step_s=0.0) < pause.FED_PAUSE_S
    assert pause_length(pause, empty, step_s=0.05) < pause.PAUSE_S  # a step that waited for a task
    # The fed pause does not depend on the step's length (a step the GIL held up still waited for nothing).
    pause.FED_PAUSE_S = 0.1
    assert pause_length(pause, executor_with(deque(["block"])), step_s=0.05) >= 0.1


def test_blocks_waiting_is_zero_where_the_executor_does_not_show_its_queue():
    assert blocks_waiting(executor_with(deque(["a", "b"]))) == 2
    assert blocks_waiting(object()) == 0
    assert blocks_waiting(SimpleNamespace(_output_node=(None, object()))) == 0
