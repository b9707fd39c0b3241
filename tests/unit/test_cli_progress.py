"""controller.cli.progress: what a CLI wait shows on stderr, on a terminal and in a log."""

from __future__ import annotations

import io
import itertools
import threading

from common.messages.api import API_HOST_SHOW, API_VM_LIST, API_VM_SHUTDOWN
from controller.cli.progress import WaitProgress, describe

WAIT = 30.0


class Stream(io.StringIO):
    """stderr that lets the test wait for the n-th write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            self.writes += 1
            self.changed.notify_all()
            return super().write(text)

    def wait_writes(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.writes >= count, WAIT)


def test_describe_names_the_operation_and_its_target() -> None:
    assert describe(API_VM_SHUTDOWN.kind, {"name": "web", "timeout_s": 60}) == "vm shutdown web"
    assert describe(API_HOST_SHOW.kind, {"host": "hv1"}) == "host show hv1"
    assert describe(API_VM_LIST.kind, {}) == "vm list"


def test_a_log_gets_whole_lines_naming_what_is_waited_for() -> None:
    stream = Stream()
    ticks = itertools.count()  # the clock: 0 at the start, one second more at each reading
    with WaitProgress(
        stream,
        "vm shutdown web",
        tty=False,
        first_after_s=0.0,
        every_s=0.01,
        clock=lambda: float(next(ticks)),
    ):
        stream.wait_writes(2)
    lines = stream.getvalue().splitlines(keepends=True)
    assert lines[0] == "waiting for the controller: vm shutdown web (1 s)\n"
    assert all(line.startswith("waiting for the controller: vm shutdown web (") for line in lines)
    assert all(line.endswith(" s)\n") for line in lines)
    assert "\r" not in stream.getvalue()


def test_a_terminal_gets_one_line_rewritten_and_erased_at_the_end() -> None:
    stream = Stream()
    with WaitProgress(stream, "vm shutdown web", tty=True, first_after_s=0.0, every_s=0.01):
        stream.wait_writes(2)
    text = stream.getvalue()
    assert "\n" not in text
    assert text.startswith("\rwaiting for the controller: vm shutdown web (")
    assert text.endswith("\r\x1b[K")  # erased: what follows starts on a clean line


def test_a_quick_answer_shows_nothing() -> None:
    stream = Stream()
    with WaitProgress(stream, "vm list", tty=False, first_after_s=WAIT):
        pass
    assert stream.getvalue() == ""
