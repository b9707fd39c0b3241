"""common.transport.amqp.FinishQueue: the consumer's reply-and-ack steps of deliveries that finish
together run in one wake-up of the connection's loop, in the order they were queued."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pika.exceptions
import pytest

from common.transport.amqp import FinishQueue


class _Loop:
    """A stand-in for pika's BlockingConnection: records what is handed to its thread."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []
        self.gone = False

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        if self.gone:
            raise pika.exceptions.ConnectionWrongStateError("connection closed")
        self.scheduled.append(callback)

    def run(self) -> None:
        callbacks, self.scheduled = self.scheduled, []
        for callback in callbacks:
            callback()


def _appends(done: list[int], n: int) -> Callable[[], None]:
    return lambda: done.append(n)


def _queue(loop: _Loop) -> FinishQueue:
    return FinishQueue(cast(Any, loop))


def test_steps_queued_before_the_loop_runs_share_one_wake_up_and_keep_their_order() -> None:
    loop, done = _Loop(), list[int]()
    finishes = _queue(loop)
    for n in range(3):
        finishes.add(_appends(done, n))
    assert len(loop.scheduled) == 1
    loop.run()
    assert done == [0, 1, 2]
    finishes.add(lambda: done.append(3))  # after a run, the next step wakes the loop again
    assert len(loop.scheduled) == 1
    loop.run()
    assert done == [0, 1, 2, 3]


def test_a_gone_connection_is_the_callers_error_and_keeps_nothing_queued() -> None:
    loop, done = _Loop(), list[str]()
    finishes = _queue(loop)
    loop.gone = True
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        finishes.add(lambda: done.append("lost"))
    loop.gone = False
    finishes.add(lambda: done.append("next"))
    assert len(loop.scheduled) == 1  # the failed step did not leave the queue looking scheduled
    loop.run()
    assert done == ["next"]
