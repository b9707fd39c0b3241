"""What a CLI call waits for, shown on stderr while it waits (never on stdout).

A call that has not been answered after ``first_after_s`` (1 s) gets a line on stderr:
``waiting for the controller: vm shutdown web (12 s)``. On a terminal the line is rewritten in
place every second and erased when the answer comes; otherwise (a log, a pipe) a new line is
written every ``every_s`` (10 s), so a log shows the wait without a line a second. The answer
itself, and ``-o json`` documents, go to stdout untouched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Any

#: seconds before the first progress line: quick answers show none
FIRST_AFTER_S = 1.0
#: seconds between lines when stderr is not a terminal
LOG_EVERY_S = 10.0
#: seconds between rewrites of the line on a terminal
TTY_EVERY_S = 1.0
#: the fields of a request body that name what it acts on, in order of preference
_TARGET_FIELDS = ("name", "vm", "host")


def describe(kind: str, body: Mapping[str, Any]) -> str:
    """``vm shutdown web`` for an ``api.vm.shutdown`` request on VM ``web`` (what a person typed,
    near enough): the operation's kind without its ``api.`` family, and the body's target."""
    words = kind.removeprefix("api.").replace(".", " ").replace("_", " ")
    target = next((v for v in (body.get(f) for f in _TARGET_FIELDS) if isinstance(v, str) and v), None)
    return words if target is None else f"{words} {target}"


class WaitProgress:
    """A context manager around one wait: shows ``waiting for WHO: WHAT (N s)`` on ``stream``
    while the block runs longer than ``first_after_s``."""

    def __init__(
        self,
        stream: IO[str],
        what: str,
        *,
        tty: bool,
        who: str = "the controller",
        first_after_s: float = FIRST_AFTER_S,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._label = f"waiting for {who}: {what}"
        self._tty = tty
        self._first_after_s = first_after_s
        self._every_s = every_s if every_s is not None else (TTY_EVERY_S if tty else LOG_EVERY_S)
        self._clock = clock
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._shown = False
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> WaitProgress:
        self._started = self._clock()
        self._thread = threading.Thread(target=self._run, name="cli-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._tty and self._shown:
                self._write("\r\x1b[K")  # erase the line: the answer (or error) follows cleanly

    def _run(self) -> None:
        # Waiting on the event, not sleeping: the line stops the moment the answer comes.
        if self._done.wait(self._first_after_s):
            return
        while True:
            with self._lock:
                if self._done.is_set():
                    return
                line = f"{self._label} ({self._clock() - self._started:.0f} s)"
                self._write(f"\r{line}\x1b[K" if self._tty else f"{line}\n")
                self._shown = True
            if self._done.wait(self._every_s):
                return

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed under us: progress is only a courtesy
            pass


__all__ = ["FIRST_AFTER_S", "LOG_EVERY_S", "TTY_EVERY_S", "WaitProgress", "describe"]
