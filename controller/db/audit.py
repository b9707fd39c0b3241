"""The audit log in the database: a batched background writer, and the query behind ``audit list``.

An API call is answered before its audit entry is written: :meth:`AuditLog.record` only puts the
entry on a bounded queue, and one writer thread inserts what has queued up in one transaction
(one INSERT of many rows), so a burst of creates costs the database one audit transaction per
batch rather than one per create, and none on the create's own path. When the queue is full (the
database is behind) the caller writes its own entry: an audit entry is never dropped to keep a
caller fast. What a crash can lose is what was queued and not yet written (see docs/security.md,
"Audit"); :meth:`AuditLog.stop` writes everything queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, insert, select
from sqlalchemy.orm import Session

from common.messages.audit import AuditEntryView, AuditList, AuditListRequest
from controller.db.errors import typed_database_errors
from controller.db.models import AuditRecord

log = logging.getLogger(__name__)

#: Entries queued at most before callers write their own.
QUEUE_CAPACITY = 10_000
#: Entries written in one transaction at most.
BATCH = 500
#: Seconds the writer waits, after the first entry of a batch, for more to join it. Calls that
#: come one after another (a script's creates, 10 ms apart) would otherwise cost one transaction
#: each, a tenth of the controller's CPU per create (docs/performance.md); a crash loses at most
#: this much more of them (docs/security.md, "Audit"). A flush or a stop does not wait for it.
LINGER_S = 0.05


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited call (see :class:`~controller.db.models.AuditRecord`)."""

    at: float
    login: str | None
    kind: str
    target: str | None
    result: str
    message: str | None
    request_id: str


#: The audit INSERT, a Core statement built once: the ORM's bulk insert of the same rows built
#: the statement and computed its cache key again for every batch (a third of the writer's CPU).
_INSERT_ENTRIES = insert(cast(Table, AuditRecord.__table__))


def insert_entries(connection: Connection, entries: Sequence[AuditEntry]) -> None:
    """Add ``entries`` in one INSERT (executemany) in the connection's transaction."""
    if entries:
        connection.execute(_INSERT_ENTRIES, [_row(e) for e in entries])


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "at": entry.at,
        "login": entry.login,
        "kind": entry.kind,
        "target": entry.target,
        "result": entry.result,
        "message": entry.message,
        "request_id": entry.request_id,
    }


def list_entries(session: Session, req: AuditListRequest) -> list[AuditEntryView]:
    """The newest ``req.limit`` entries that pass ``req``'s filters, newest first."""
    query = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.id.desc()).limit(req.limit)
    if req.user is not None:
        query = query.where(AuditRecord.login == req.user)
    if req.since is not None:
        query = query.where(AuditRecord.at >= req.since)
    if req.kind is not None:
        query = query.where(AuditRecord.kind == req.kind)
    return [
        AuditEntryView(
            at=row.at,
            login=row.login,
            kind=row.kind,
            target=row.target,
            result=row.result,
            message=row.message,
            request_id=row.request_id,
        )
        for row in session.scalars(query)
    ]


@dataclass(frozen=True, slots=True)
class _Mark:
    """A place in the queue: ``done`` is set once every entry queued before it is written."""

    done: threading.Event
    #: the writer ends after it
    stop: bool = False


class AuditLog:
    """The controller's audit log: :meth:`record` queues, a writer thread inserts in batches."""

    def __init__(self, engine: Engine, *, capacity: int = QUEUE_CAPACITY, linger_s: float = LINGER_S) -> None:
        self._engine = engine
        self._linger_s = linger_s
        self._queue: queue.Queue[AuditEntry | _Mark] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        #: the queue was full at the last record (its warning is logged once per episode)
        self._overflowing = False

    def record(self, entry: AuditEntry) -> None:
        """Queue ``entry`` for the writer; write it here and now when the queue is full."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            if not self._overflowing:  # once per episode, not once per call of a flood
                log.warning(
                    "audit queue full (%d entries): callers write their own entries", self._queue.maxsize
                )
            self._overflowing = True
            self._write([entry])
            return
        self._overflowing = False

    def start(self) -> None:
        self._thread.start()

    def flush(self) -> None:
        """Return once every entry recorded before the call is in the database.

        A mark goes through the queue behind them (entries recorded meanwhile do not delay it).
        """
        if not self._thread.is_alive():
            self._drain_here()
            return
        mark = _Mark(threading.Event())
        self._queue.put(mark)
        mark.done.wait()

    def stop(self) -> None:
        """Write what is queued and end the writer."""
        if self._thread.is_alive():
            self._queue.put(_Mark(threading.Event(), stop=True))
            self._thread.join()
        self._drain_here()

    def list(self, req: AuditListRequest) -> AuditList:
        """``api.audit.list``: what was recorded until now (the queue is written first)."""
        self.flush()
        with typed_database_errors(), Session(self._engine) as session:
            return AuditList(entries=tuple(list_entries(session, req)))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            until = time.monotonic() + self._linger_s
            # A mark (flush, stop) ends the gathering: its caller waits for what is before it.
            while len(batch) < BATCH and not isinstance(batch[-1], _Mark):
                try:
                    batch.append(self._queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
            if self._settle(batch):
                return

    def _drain_here(self) -> None:
        batch: list[AuditEntry | _Mark] = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._settle(batch)

    def _settle(self, batch: Sequence[AuditEntry | _Mark]) -> bool:
        """Write the batch's entries, then release its marks; True when one says stop."""
        self._write([item for item in batch if isinstance(item, AuditEntry)])
        marks = [item for item in batch if isinstance(item, _Mark)]
        for mark in marks:
            mark.done.set()
        return any(mark.stop for mark in marks)

    def _write(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        try:
            with self._engine.begin() as connection:
                insert_entries(connection, entries)
        except Exception:
            # The entries are still in the log lines (controller.audit logs each call).
            log.exception("could not write %d audit entries", len(entries))


__all__ = ["BATCH", "QUEUE_CAPACITY", "AuditEntry", "AuditLog", "insert_entries", "list_entries"]
