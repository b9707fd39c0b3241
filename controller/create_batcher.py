"""Group commit: calls that arrive together are handled as one batch by one of their threads.

The controller's API workers each handle one create. Deciding and claiming each alone costs one
transaction (and its round trips and commit) per create; under load, creates queue behind each
other's transactions anyway. A :class:`GroupCommit` lets them share: a worker hands its item over
and waits. When no batch is being run, the worker that arrives becomes the *leader*: it takes
what is queued (at most ``max_size`` items), runs the batch function once for all of them, hands
each waiting worker its own result, and returns its own. Items that arrive while a batch runs
form the next batch. There is no thread of its own, so nothing needs starting or stopping.

A lone item is run at once: the leader waits for more only while other callers have announced
that an item is on its way (:meth:`GroupCommit.announce`), and at most ``window_s``. So the
window costs nothing when nothing else is coming, and a batch never waits for traffic that is
not there.

Each waiting caller sleeps on a lock of its own, released once: when its item is done, or when
the lead is handed to it (the first item queued when a batch ends leads the next one). One
condition shared by every waiter would wake all of them at every submit and at the end of every
batch, only for most to sleep again: with the API's 16 workers that herd cost several per cent of
the controller's CPU in a create burst (docs/performance.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _held() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(slots=True)
class _Slot(Generic[T, R]):
    item: T
    #: held from the start; released once, when ``done`` or ``lead`` is set (its caller waits on it)
    wake: threading.Lock = field(default_factory=_held)
    done: bool = False
    #: the lead was handed to this item's caller: it gathers and runs the next batch
    lead: bool = False
    outcome: object = None


class Ticket(Generic[T, R]):
    """An announced item: :meth:`submit` hands it over (once)."""

    def __init__(self, batcher: GroupCommit[T, R]) -> None:
        self._batcher = batcher
        self._pending = True

    def submit(self, item: T) -> R:
        """Run ``item`` in a batch and return its result (or raise its exception)."""
        if not self._pending:
            raise RuntimeError("a ticket submits one item")
        self._pending = False
        return self._batcher._submit(item, announced=True)

    def _withdraw(self) -> None:
        if self._pending:
            self._pending = False
            self._batcher._arrived()


class GroupCommit(Generic[T, R]):
    """Run items in batches: ``run(items)`` returns one outcome per item, in order.

    ``run`` is called by one of the submitting threads, never by two at once. An exception
    from ``run`` itself is every item's outcome.
    """

    def __init__(
        self, run: Callable[[Sequence[T]], Sequence[R | BaseException]], *, window_s: float, max_size: int
    ) -> None:
        if max_size < 1 or window_s < 0:
            raise ValueError("max_size must be at least 1 and window_s not negative")
        self._run = run
        self._window_s = window_s
        self._max_size = max_size
        #: guards the queue and the counts; only a leader gathering a batch waits on it
        self._cond = threading.Condition()
        self._queue: list[_Slot[T, R]] = []
        #: a batch is being gathered or run, or the lead was handed to a queued item's caller
        self._leading = False
        #: callers that announced an item and have not submitted it yet
        self._coming = 0
        #: batches run and items in them (for the benches and tests)
        self.batches = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Items handed over and waiting for a batch to take them."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def announce(self) -> Iterator[Ticket[T, R]]:
        """Say an item is on its way (a leader may wait for it, within the window); submit it
        with the ticket, or leave the block without submitting to withdraw it."""
        with self._cond:
            self._coming += 1
        ticket: Ticket[T, R] = Ticket(self)
        try:
            yield ticket
        finally:
            ticket._withdraw()

    def submit(self, item: T) -> R:
        """Run ``item`` in a batch (without announcing it first)."""
        return self._submit(item, announced=False)

    # ------------------------------------------------------------------ inside

    def _arrived(self) -> None:
        with self._cond:
            self._coming -= 1
            self._cond.notify()  # the leader, if it waits for this announced item

    def _submit(self, item: T, *, announced: bool) -> R:
        slot: _Slot[T, R] = _Slot(item)
        batch: list[_Slot[T, R]] | None = None
        with self._cond:
            if announced:
                self._coming -= 1
            self._queue.append(slot)
            if self._leading:
                self._cond.notify()  # the leader, if it waits for more within the window
            else:
                self._leading = True
                batch = self._gather()
        while True:
            if batch is None:
                slot.wake.acquire()  # released once: this item is done, or the lead is ours
                if slot.done:
                    break
                assert slot.lead  # the only other reason its lock is released
                with self._cond:
                    batch = self._gather()
            self._lead(batch)
            if slot.done:
                break
            batch = None
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome  # type: ignore[return-value]  # run() gave an R for this slot

    def _gather(self) -> list[_Slot[T, R]]:
        """Take the next batch (under the condition's lock): wait, within the window, only for
        items announced and not yet submitted."""
        deadline = time.monotonic() + self._window_s
        while len(self._queue) < self._max_size and self._coming > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, self._queue = self._queue[: self._max_size], self._queue[self._max_size :]
        return batch

    def _lead(self, batch: list[_Slot[T, R]]) -> None:
        outcomes: Sequence[object] = ()
        try:
            outcomes = self._run([s.item for s in batch])
        except Exception as exc:  # noqa: BLE001  every item's outcome, raised by each caller
            outcomes = [exc] * len(batch)
        finally:  # every waiting caller must be woken, whatever happened here
            if len(outcomes) != len(batch):
                failed = RuntimeError(f"a batch of {len(batch)} items gave {len(outcomes)} outcomes")
                outcomes = [failed] * len(batch)
            with self._cond:
                for slot, outcome in zip(batch, outcomes, strict=True):
                    slot.outcome = outcome
                    slot.done = True
                self.batches += 1
                self.items += len(batch)
                # What queued meanwhile is the next batch, led by the caller of its first item
                # (whose item is therefore in it); the lead stays taken until that caller runs it.
                heir = self._queue[0] if self._queue else None
                if heir is None:
                    self._leading = False
                else:
                    heir.lead = True
            # Wake exactly the callers concerned, outside the lock they do not need.
            for slot in batch:
                slot.wake.release()
            if heir is not None:
                heir.wake.release()
