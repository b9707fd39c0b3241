"""The audit log's store (controller/db/audit.py) on SQLite and PostgreSQL (marker ``db``)."""

from __future__ import annotations

import logging
import time

import pytest
import sqlalchemy as sa

from common.messages.audit import AuditListRequest
from controller.db.audit import AuditEntry, AuditLog


def entry(n: int, login: str = "olga", kind: str = "api.x") -> AuditEntry:
    return AuditEntry(
        at=1000.0 + n, login=login, kind=kind, target=f"vm{n}", result="ok", message=None, request_id=f"r{n}"
    )


def test_recorded_entries_are_listed_newest_first_with_filters(engine: sa.Engine) -> None:
    log = AuditLog(engine)
    log.start()
    try:
        for n in range(5):
            log.record(entry(n, login="olga" if n % 2 else "rita", kind="api.a" if n < 3 else "api.b"))
        listed = log.list(AuditListRequest())  # written before it is read: no wait needed
        assert [e.request_id for e in listed.entries] == ["r4", "r3", "r2", "r1", "r0"]
        assert [e.request_id for e in log.list(AuditListRequest(user="olga")).entries] == ["r3", "r1"]
        assert [e.request_id for e in log.list(AuditListRequest(kind="api.b")).entries] == ["r4", "r3"]
        assert [e.request_id for e in log.list(AuditListRequest(since=1003.0)).entries] == ["r4", "r3"]
        assert [e.request_id for e in log.list(AuditListRequest(limit=1)).entries] == ["r4"]
    finally:
        log.stop()


def test_calls_one_after_another_share_a_transaction_and_a_flush_does_not_wait_for_more(
    engine: sa.Engine,
) -> None:
    inserts: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("INSERT INTO audit_log"):
            inserts.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    # An hour of linger: a flush that waited for it would hang the test (pytest's timeout).
    log = AuditLog(engine, linger_s=3600.0)
    log.start()
    try:
        log.record(entry(1))
        time.sleep(0.1)  # the writer has taken the first entry and waits for more
        log.record(entry(2))
        assert [e.request_id for e in log.list(AuditListRequest()).entries] == ["r2", "r1"]
        assert len(inserts) == 1, "both entries in one INSERT"
    finally:
        log.stop()
        sa.event.remove(engine, "before_cursor_execute", seen)


def test_stop_writes_what_is_queued(engine: sa.Engine) -> None:
    log = AuditLog(engine)  # no writer thread: everything stays queued until stop
    for n in range(3):
        log.record(entry(n))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one() == 0
    log.stop()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one() == 3


def test_a_full_queue_makes_the_caller_write_nothing_is_dropped(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(engine, capacity=2)  # no writer thread: the queue fills
    with caplog.at_level(logging.WARNING, "controller.db.audit"):
        for n in range(5):
            log.record(entry(n))
    assert [r.getMessage() for r in caplog.records] == [
        "audit queue full (2 entries): callers write their own entries"
    ]  # once for the episode, not once per call
    with engine.connect() as conn:  # the three that did not fit were written by the caller
        assert conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one() == 3
    assert len(log.list(AuditListRequest()).entries) == 5
