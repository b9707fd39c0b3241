"""The SQLite command journal."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.journal import SqliteJournal
from common.errors import StorageError
from common.messages.vm import VM_CREATE, VM_DELETE, VM_START


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_put_get(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db")
    assert journal.get("m1") is None
    journal.put("m1", VM_CREATE.kind, b"\x81\xa2ok\xc3")
    assert journal.get("m1") == b"\x81\xa2ok\xc3"
    assert journal.kind_of("m1") == VM_CREATE.kind
    journal.close()


def test_first_reply_wins(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db")
    journal.put("m1", VM_START.kind, b"first")
    journal.put("m1", VM_START.kind, b"second")
    assert journal.get("m1") == b"first"
    assert len(journal) == 1
    journal.close()


def test_survives_a_restart(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "state" / "j.db")
    journal.put("m1", VM_DELETE.kind, b"reply")
    journal.close()
    reopened = SqliteJournal(tmp_path / "state" / "j.db")
    assert reopened.get("m1") == b"reply"
    reopened.close()


def test_prunes_by_count(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db", max_entries=3)
    for i in range(5):
        journal.put(f"m{i}", VM_START.kind, b"r")
    assert len(journal) == 3
    assert [journal.get(f"m{i}") is not None for i in range(5)] == [False, False, True, True, True]
    journal.close()


def test_prunes_by_age(tmp_path: Path) -> None:
    clock = Clock()
    journal = SqliteJournal(tmp_path / "j.db", max_age_s=3600, clock=clock)
    journal.put("old", VM_START.kind, b"r")
    clock.now += 3601
    journal.put("new", VM_START.kind, b"r")
    assert journal.get("old") is None
    assert journal.get("new") == b"r"
    journal.close()


def test_concurrent_puts(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db")

    def worker(n: int) -> None:
        for i in range(50):
            journal.put(f"w{n}-{i}", VM_START.kind, bytes([n, i]))
            assert journal.get(f"w{n}-{i}") == bytes([n, i])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))  # re-raises what a worker raised
    assert len(journal) == 200
    journal.close()


def test_closed_journal_raises(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db")
    journal.close()
    with pytest.raises(StorageError, match="closed"):
        journal.get("m1")


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot open"):
        SqliteJournal(blocker / "j.db")


def test_wait_for_returns_the_reply_once_another_thread_puts_it(tmp_path: Path) -> None:
    # An hour between looks: only the put's wake-up can end the wait within the result's timeout.
    journal = SqliteJournal(tmp_path / "j.db", poll_s=3600)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(journal.wait_for, "m1", float("inf"))
        try:
            assert not waiting.done()
            journal.put("m2", VM_START.kind, b"another")
            journal.put("m1", VM_START.kind, b"answer")
            assert waiting.result(timeout=30) == b"answer"
            assert journal.wait_for("m1", 0.0) == b"answer"  # recorded already: no wait at all
        finally:
            journal.close()  # wakes a waiter that a failure left behind


def test_wait_for_gives_up_at_the_deadline(tmp_path: Path) -> None:
    clock = Clock()
    journal = SqliteJournal(tmp_path / "j.db", clock=clock)
    assert journal.wait_for("m1", clock.now) is None
    assert journal.wait_for("m1", clock.now - 5) is None
    journal.close()


def test_wait_for_gives_up_when_the_journal_closes(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.db", poll_s=3600)  # the close must wake it
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(journal.wait_for, "m1", float("inf"))
        journal.close()
        assert waiting.result(timeout=30) is None
