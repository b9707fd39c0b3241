"""controller.create_batcher.GroupCommit: calls that arrive together run as one batch.

Threads here are bounded by joins with a timeout; no assertion is about how long anything took.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
from vfsupport import wait_until

from controller.create_batcher import GroupCommit

BOUND_S = 30.0  # a liveness bound: a hung batcher fails the test instead of hanging it


class _Recorder:
    """A batch function that records its batches; the first one waits for ``release``."""

    def __init__(self, *, hold_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        if not self.batches:
            self.release.wait(BOUND_S)
        self.batches.append(list(items))
        return [ValueError(f"refused {i}") if i.startswith("bad") else i.upper() for i in items]


def _in_threads(
    batcher: GroupCommit[str, str], items: Sequence[str]
) -> tuple[list[threading.Thread], dict[str, object]]:
    outcomes: dict[str, object] = {}

    def one(item: str) -> None:
        try:
            outcomes[item] = batcher.submit(item)
        except ValueError as exc:
            outcomes[item] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in items]
    for t in threads:
        t.start()
    return threads, outcomes


def _join(threads: Sequence[threading.Thread]) -> None:
    for t in threads:
        t.join(BOUND_S)
        assert not t.is_alive()


def test_a_lone_item_runs_at_once_even_with_a_long_window() -> None:
    run = _Recorder()
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=3600.0, max_size=32)
    threads, outcomes = _in_threads(batcher, ["a"])
    _join(threads)  # waiting for the window would outlive the join's bound
    assert outcomes == {"a": "A"}
    assert run.batches == [["a"]]


def test_items_that_queue_while_a_batch_runs_form_the_next_batch() -> None:
    run = _Recorder(hold_first=True)
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=32)
    first, outcomes = _in_threads(batcher, ["a"])
    wait_until(lambda: batcher.queued == 0, BOUND_S, "a leads")
    rest, more = _in_threads(batcher, ["b", "c", "d"])
    wait_until(lambda: batcher.queued == 3, BOUND_S, "three items queued behind the first batch")
    run.release.set()
    _join([*first, *rest])
    assert run.batches[0] == ["a"]
    assert len(run.batches) == 2 and sorted(run.batches[1]) == ["b", "c", "d"]
    assert {**outcomes, **more} == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert (batcher.batches, batcher.items) == (2, 4)


def test_batches_are_at_most_max_size() -> None:
    run = _Recorder(hold_first=True)
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=2)
    first, _ = _in_threads(batcher, ["a"])
    wait_until(lambda: batcher.queued == 0, BOUND_S, "a leads")
    rest, _ = _in_threads(batcher, ["b", "c", "d", "e", "f"])
    wait_until(lambda: batcher.queued == 5, BOUND_S, "five items queued")
    run.release.set()
    _join([*first, *rest])
    assert [len(b) for b in run.batches] == [1, 2, 2, 1]


def test_one_items_exception_is_raised_by_that_caller_only() -> None:
    run = _Recorder(hold_first=True)
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=32)
    first, _ = _in_threads(batcher, ["a"])
    wait_until(lambda: batcher.queued == 0, BOUND_S, "a leads")
    rest, more = _in_threads(batcher, ["b", "bad", "c"])
    wait_until(lambda: batcher.queued == 3, BOUND_S, "three items queued")
    run.release.set()
    _join([*first, *rest])
    assert len(run.batches) == 2
    assert isinstance(more["bad"], ValueError) and str(more["bad"]) == "refused bad"
    assert (more["b"], more["c"]) == ("B", "C")


def test_a_failing_batch_is_every_callers_error_and_the_next_batch_runs() -> None:
    calls: list[int] = []

    def run(items: Sequence[str]) -> list[str | BaseException]:
        calls.append(len(items))
        if len(calls) == 1:
            raise ValueError("database gone")
        return [i.upper() for i in items]

    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=32)
    with pytest.raises(ValueError, match="database gone"):
        batcher.submit("a")
    assert batcher.submit("b") == "B"


def test_a_leader_waits_within_the_window_for_an_announced_item() -> None:
    run = _Recorder()
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=BOUND_S, max_size=32)
    with batcher.announce() as ticket:
        threads, outcomes = _in_threads(batcher, ["a"])
        wait_until(lambda: batcher.queued == 1, BOUND_S, "the leader waiting for the announced item")
        assert ticket.submit("b") == "B"
    _join(threads)
    assert run.batches == [["a", "b"]]
    assert outcomes == {"a": "A"}


def test_a_withdrawn_announcement_releases_the_leader() -> None:
    run = _Recorder()
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=3600.0, max_size=32)
    with batcher.announce():
        threads, outcomes = _in_threads(batcher, ["a"])
        wait_until(lambda: batcher.queued == 1, BOUND_S, "the leader waiting for the announced item")
    _join(threads)  # left the block without submitting: the leader goes on
    assert outcomes == {"a": "A"}


def test_the_caller_of_the_first_queued_item_leads_the_next_batch() -> None:
    leaders: list[str] = []

    def run(items: Sequence[str]) -> list[str | BaseException]:
        leaders.append(threading.current_thread().name)
        if len(leaders) == 1:
            release.wait(BOUND_S)
        return [i.upper() for i in items]

    release = threading.Event()
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=2)
    threads: list[threading.Thread] = []
    for item in ["a", "b", "c", "d"]:
        thread = threading.Thread(target=batcher.submit, args=(item,), name=f"caller-{item}")
        thread.start()
        threads.append(thread)
        if item == "a":
            wait_until(lambda: bool(leaders), BOUND_S, "a leads")
        else:
            wait_until(_queued(batcher, len(threads) - 1), BOUND_S, f"{item} queued in order")
    release.set()
    _join(threads)
    # Each waiting caller sleeps until its own item is done or the lead is handed to it: the
    # next batch ([b, c], then [d]) is run by the caller of its first item, not by whoever woke.
    assert leaders == ["caller-a", "caller-b", "caller-d"]


def test_many_callers_in_small_batches_each_get_their_own_outcome() -> None:
    run = _Recorder()
    batcher: GroupCommit[str, str] = GroupCommit(run, window_s=0.0, max_size=3)
    items = [f"bad{n}" if n % 7 == 0 else f"i{n}" for n in range(200)]
    threads, outcomes = _in_threads(batcher, items)
    _join(threads)  # a lost wake-up (a caller never told its item is done or its lead) hangs here
    for item in items:
        outcome = outcomes[item]
        if item.startswith("bad"):
            assert isinstance(outcome, ValueError) and str(outcome) == f"refused {item}"
        else:
            assert outcome == item.upper()
    assert sum(len(b) for b in run.batches) == 200 and max(len(b) for b in run.batches) <= 3
    assert (batcher.batches, batcher.items) == (len(run.batches), 200)


def _queued(batcher: GroupCommit[str, str], count: int) -> Callable[[], bool]:
    return lambda: batcher.queued == count
