"""The API request journal's table (``api_requests``): statements only, in the caller's session.

The *started* insert is the arbiter between controllers sharing one database: it is an
``INSERT ... ON CONFLICT DO NOTHING`` on the request id (primary key) and on (caller, key)
(unique), so of two controllers handed the same request exactly one inserts it; the other reads
the row that won (:func:`start` answers False) and treats the request as a redelivery.
"""

from __future__ import annotations

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


def start(session: Session, entry: Entry) -> bool:
    """Record ``entry`` as started; False (nothing written) when its id, or its caller's key, is
    journalled already."""
    values = {
        "request_id": entry.request_id,
        "kind": entry.kind,
        "caller": entry.caller,
        "idempotency_key": entry.idempotency_key,
        "digest": entry.digest,
        "state": State.STARTED.value,
        "reply": None,
        "created_at": entry.created_at,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # RETURNING says whether the row went in (a rowcount is not reliable across drivers here).
    statement = insert(ApiRequest).values(**values).on_conflict_do_nothing().returning(ApiRequest.request_id)
    return session.execute(statement).first() is not None


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


def _entry_of(request_id: str, caller: str, key: str | None) -> ColumnElement[bool]:
    """The entry of a request: by its id, or (a retry's) by its caller's key."""
    by_id = ApiRequest.request_id == request_id
    if key is None:
        return by_id
    return or_(by_id, and_(ApiRequest.caller == caller, ApiRequest.idempotency_key == key))


def finish(session: Session, request_id: str, caller: str, key: str | None, reply: bytes) -> None:
    """Record the answer of a started request (one UPDATE)."""
    session.execute(
        update(ApiRequest)
        .where(_entry_of(request_id, caller, key), ApiRequest.state == State.STARTED.value)
        .values(state=State.DONE.value, reply=reply)
    )


def forget(session: Session, request_id: str, caller: str, key: str | None) -> None:
    """Drop a started request's entry (its answer was a retryable error: a retry runs it again)."""
    session.execute(
        delete(ApiRequest).where(_entry_of(request_id, caller, key), ApiRequest.state == State.STARTED.value)
    )


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


__all__ = ["Entry", "State", "find", "finish", "forget", "prune", "start"]
