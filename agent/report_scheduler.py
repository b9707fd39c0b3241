"""Heartbeats and reports of many hosts from one thread (the multi-host agent).

A :class:`~agent.reporter.Reporter` per host keeps its own intervals, sequence numbers and
pending requests; :class:`ReportScheduler` calls their :meth:`~agent.reporter.Reporter.step`
in the order they fall due, from one thread, instead of one thread per host (a thousand threads
would cost stacks and context switches for work that takes a millisecond per host).

The first reports and heartbeats are staggered evenly over ``spread`` seconds, so that the
hosts' traffic stays spread out afterwards (each next time is counted from the last one) rather
than every host reporting in the same instant. A report requested by a command
(:meth:`~agent.reporter.Reporter.request_report`) is sent on the next turn of the loop.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence

from agent.reporter import Reporter

log = logging.getLogger(__name__)


class ReportScheduler:
    """Drives ``reporters`` from one thread: each is stepped when it is due or was asked for a report."""

    def __init__(
        self,
        reporters: Sequence[Reporter],
        *,
        spread: float,
        name: str = "reports",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reporters = tuple(reporters)
        self._spread = max(0.0, spread)
        self._name = name
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: indexes of reporters asked for a report since the loop last looked
        self._requested: set[int] = set()
        #: (due, generation, index): one live entry per reporter; older generations are skipped
        self._heap: list[tuple[float, int, int]] = []
        self._generation = [0] * len(self._reporters)
        self._final_report = True
        self._thread: threading.Thread | None = None
        for index, reporter in enumerate(self._reporters):
            reporter.notify_with(self._requester(index))

    def _requester(self, index: int) -> Callable[[], None]:
        def requested() -> None:
            with self._lock:
                self._requested.add(index)
            self._wake.set()

        return requested

    def start(self) -> None:
        """Stagger the first reports over ``spread`` seconds from now and run the thread."""
        now = self._monotonic()
        count = len(self._reporters)
        for index, reporter in enumerate(self._reporters):
            due = now + self._spread * index / count
            reporter.begin(due)
            self._push(index, due)
        self._thread = threading.Thread(target=self.run, name=f"{self._name}-scheduler", daemon=True)
        self._thread.start()

    def stop(self, *, final_report: bool = True, timeout: float = 60.0) -> None:
        """Stop the thread; it sends every host's last report first unless told not to."""
        self._final_report = final_report
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _push(self, index: int, due: float) -> None:
        self._generation[index] += 1
        heapq.heappush(self._heap, (due, self._generation[index], index))

    def _step(self, index: int) -> None:
        # Reporter.step logs and survives what the broker or the hypervisor does; this guard is
        # for a bug in it, which must not end every host's reporting.
        try:
            due = self._reporters[index].step()
        except Exception:
            log.exception("%s: reporter of %s failed (bug)", self._name, self._reporters[index].host_id)
            due = self._monotonic() + 1.0
        self._push(index, due)

    def run(self) -> None:
        """The loop: requested reporters first, then those due, then sleep until the next is due."""
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                requested, self._requested = self._requested, set()
            for index in sorted(requested):
                self._step(index)
            now = self._monotonic()
            while self._heap and self._heap[0][0] <= now and not self._stop.is_set():
                _due, generation, index = heapq.heappop(self._heap)
                if generation == self._generation[index]:
                    self._step(index)
                if self._requested:
                    break  # a command waits for its report: serve it before the next due host
            if self._requested:
                continue
            delay = self._heap[0][0] - self._monotonic() if self._heap else 1.0
            self._wake.wait(max(0.0, delay))
        if self._final_report:
            for reporter in self._reporters:
                reporter.send_final_report()


__all__ = ["ReportScheduler"]
