"""The API request journal's table (``api_requests``): statements only, in the caller's session.

The *started* insert is the arbiter between controllers sharing one database: it is an
``INSERT ... ON CONFLICT DO NOTHING`` on the request id (primary key) and on (caller, key)
(unique), so of two controllers handed the same request exactly one inserts it; the other reads
the row that won (:func:`start` answers False) and treats the request as a redelivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from controller.db.models import ApiRequest


class State(StrEnum):
    """Where a journalled request is."""

    STARTED = "started"  # a controller took it; its handler ran or is running
    DONE = "done"  # answered: ``reply`` holds the answer


@dataclass(frozen=True, slots=True)
class Entry:
    """One journalled request."""

    request_id: str
    kind: str
    caller: str
    idempotency_key: str | None
    digest: str
    state: State
    reply: bytes | None
    created_at: float


def start(session: Session, entries: Sequence[Entry]) -> set[str]:
    """Record ``entries`` as started, in one INSERT; the ids of those that went in (the others'
    id, or their caller's key, is journalled already: nothing of theirs is written)."""
    if not entries:
        return set()
    rows = [
        {
            "request_id": e.request_id,
            "kind": e.kind,
            "caller": e.caller,
            "idempotency_key": e.idempotency_key,
            "digest": e.digest,
            "state": State.STARTED.value,
            "reply": None,
            "created_at": e.created_at,
        }
        for e in entries
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # RETURNING says which rows went in (a rowcount is not reliable across drivers here).
    statement = insert(ApiRequest).values(rows).on_conflict_do_nothing().returning(ApiRequest.request_id)
    return set(session.scalars(statement))


def find(session: Session, request_id: str, caller: str, key: str | None) -> Entry | None:
    """The entry of ``request_id``, else the one of ``caller``'s ``key`` (None: neither)."""
    row = session.get(ApiRequest, request_id)
    if row is None and key is not None:
        row = session.scalars(
            select(ApiRequest).where(ApiRequest.caller == caller, ApiRequest.idempotency_key == key)
        ).first()
    if row is None:
        return None
    return Entry(
        request_id=row.request_id,
        kind=row.kind,
        caller=row.caller,
        idempotency_key=row.idempotency_key,
        digest=row.digest,
        state=State(row.state),
        reply=row.reply,
        created_at=row.created_at,
    )


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer to a started request: its encoded reply, or None to drop the entry."""

    request_id: str
    caller: str
    key: str | None
    reply: bytes | None


def _entry_of(request_id: str, caller: str, key: str | None) -> ColumnElement[bool]:
    """The entry of a request: by its id, or (a retry's) by its caller's key."""
    by_id = ApiRequest.request_id == request_id
    if key is None:
        return by_id
    return or_(by_id, and_(ApiRequest.caller == caller, ApiRequest.idempotency_key == key))


def finish(session: Session, done: Sequence[Finished]) -> None:
    """Record the answers of started requests (a None reply drops the entry: the answer was a
    retryable error, so a retry runs again)."""
    for item in done:
        entry = and_(
            _entry_of(item.request_id, item.caller, item.key), ApiRequest.state == State.STARTED.value
        )
        if item.reply is None:
            session.execute(delete(ApiRequest).where(entry))
        else:
            session.execute(update(ApiRequest).where(entry).values(state=State.DONE.value, reply=item.reply))


def prune(session: Session, before: float, limit: int) -> int:
    """Delete at most ``limit`` entries created before ``before`` (the oldest first, through the
    ``created_at`` index); the number deleted."""
    oldest = (
        select(ApiRequest.request_id)
        .where(ApiRequest.created_at < before)
        .order_by(ApiRequest.created_at)
        .limit(limit)
    )
    result = session.execute(delete(ApiRequest).where(ApiRequest.request_id.in_(oldest)))
    return int(getattr(result, "rowcount", 0))


__all__ = ["Entry", "Finished", "State", "find", "finish", "prune", "start"]
