"""How long Ray Data's executor pauses between scheduling steps (upstream/ray_private.py), by
what its output queue holds. The executor here is a stand-in holding only that queue: the pause
reads nothing else. (A test on a real pipeline depended on Ray Data's block sizes at the time: in
one run of the suite blocks rarely waited for the reader, so it could not check the pause.)"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from upstream.ray_private import IdleLoopPause, blocks_waiting

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def executor_with(queue: deque) -> SimpleNamespace:
    """What the pause reads of Ray Data's StreamingExecutor: its output node's (operator, state)."""
    return SimpleNamespace(_output_node=(None, SimpleNamespace(output_queue=queue)))


class FakeClock:
    """Time that passes only when the pause sleeps; `at(t, action)` runs an action (a reader taking
    its block) once the clock reaches t."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.actions: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, action) -> None:
        self.actions.append((when, action))

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when, action in [a for a in self.actions if a[0] <= self.now]:
            self.actions.remove((when, action))
            action()


def pause_length(pause: IdleLoopPause, clock: FakeClock, executor: object, step_s: float = 0.0) -> float:
    """Seconds `pause` sleeps after a scheduling step that took `step_s`."""
    pause._last = clock() - step_s
    began = clock()
    pause.on_execution_step(executor)
    return clock() - began


def paced() -> tuple[IdleLoopPause, FakeClock]:
    clock = FakeClock()
    return IdleLoopPause(clock=clock, sleep=clock.sleep), clock


def test_a_waiting_block_holds_the_executor_until_the_reader_takes_it():
    pause, clock = paced()
    pause.FED_PAUSE_S = 0.3
    assert pause_length(pause, clock, executor_with(deque(["block"]))) >= 0.3  # a slow reader: the whole pause

    queue = deque(["block"])
    clock.at(clock() + 0.03, queue.popleft)  # a reader that takes its block after 30 ms
    length = pause_length(pause, clock, executor_with(queue))
    assert 0.03 <= length <= 0.03 + pause.FED_SLICE_S, length  # ends within a slice of the take, not at 0.3 s


def test_without_a_waiting_block_only_a_step_that_took_no_time_is_followed_by_the_short_pause():
    pause, clock = paced()
    empty = executor_with(deque())
    assert pause_length(pause, clock, empty, step_s=0.0) == pytest.approx(pause.PAUSE_S)
    assert pause_length(pause, clock, empty, step_s=0.05) == 0.0  # a step that waited for a task
    # The fed pause does not depend on the step's length (a step the GIL held up still waited for nothing).
    pause.FED_PAUSE_S = 0.1
    assert pause_length(pause, clock, executor_with(deque(["block"])), step_s=0.05) >= 0.1


def test_blocks_waiting_is_zero_where_the_executor_does_not_show_its_queue():
    assert blocks_waiting(executor_with(deque(["a", "b"]))) == 2
    assert blocks_waiting(object()) == 0
    assert blocks_waiting(SimpleNamespace(_output_node=(None, object()))) == 0
