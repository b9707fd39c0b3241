"""Database errors as the error tree: the one place a SQLAlchemy/DBAPI error is translated.

Every transaction of the controller's request handling runs inside :func:`typed_database_errors`
(``ControllerService.tx``), so no database error reaches a client as an ``InternalError`` with
SQL text: the statement and the driver's message are logged here, server-side, and the client
gets a typed error that says what to do:

* a unique index refused a row -> ``AlreadyExists``; another constraint -> ``InvalidRequest``;
* a value the column cannot hold (too long, out of range, a NUL byte) -> ``InvalidRequest``;
* the connection lost, the server restarting, a serialization or deadlock failure, a pool
  timeout -> ``StoreUnavailable`` (retryable: nothing was committed);
* anything else from the database (a statement the schema does not know) -> ``InternalError``
  without the SQL: that one is a bug.

Message bounds (common.messages.limits) refuse bad values before any statement runs; this is
the net under them, for what a bound does not say (and for SQLite, which enforces no length).

A transient failure is first retried where the transaction can be run again as a whole
(:func:`transient_retries`); only when it lasts does the client get ``StoreUnavailable``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import tenacity
from sqlalchemy import exc as sa

from common.errors import AlreadyExists, InternalError, InvalidRequest, StoreUnavailable, VirtfleetError

log = logging.getLogger(__name__)

#: SQLSTATE of a unique violation (PostgreSQL); SQLite says so in its message.
_UNIQUE_VIOLATION = "23505"
#: SQLSTATE classes of transient failures: 08 connection, 40 transaction rollback
#: (serialization, deadlock), 53 insufficient resources, 57 operator intervention (shutdown).
_TRANSIENT_CLASSES = ("08", "40", "53", "57")


def translate(error: sa.SQLAlchemyError) -> VirtfleetError:
    """The typed error for a database error (its text is for the log, never the message)."""
    sqlstate = str(getattr(getattr(error, "orig", None), "sqlstate", "") or "")
    if isinstance(error, sa.IntegrityError):
        if sqlstate == _UNIQUE_VIOLATION or "UNIQUE constraint failed" in str(error.orig):
            return AlreadyExists("an object with that identity exists already")
        return InvalidRequest("the request refers to something that does not fit the stored state")
    if isinstance(error, sa.DataError):
        return InvalidRequest(
            "a value does not fit what the database stores (too long, out of range or a NUL byte)"
        )
    if (
        isinstance(error, sa.OperationalError | sa.InterfaceError | sa.DisconnectionError | sa.TimeoutError)
        or sqlstate[:2] in _TRANSIENT_CLASSES
        or (isinstance(error, sa.DBAPIError) and error.connection_invalidated)
    ):
        return StoreUnavailable(
            "the controller's database is unavailable for the moment; nothing was changed"
        )
    return InternalError("the controller's database refused a statement (a bug: see the controller's log)")


@contextmanager
def typed_database_errors() -> Iterator[None]:
    """Run a transaction; a database error leaves it as its typed error (see the module docstring)."""
    try:
        yield
    except sa.SQLAlchemyError as error:
        typed = translate(error)
        # The SQL text and the driver's words stay here; a traceback only for what is a bug.
        if isinstance(typed, InternalError):
            log.error("database error, answered as %s: %s", type(typed).__name__, error, exc_info=True)
        else:
            log.warning("database error, answered as %s: %s", type(typed).__name__, error)
        raise typed from error


def transient_retries(within_s: float, *, sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """Attempts of one transaction, run again while it fails with ``StoreUnavailable`` (a
    transient failure: connection lost, the server restarting, a deadlock or serialization
    failure), with jittered exponential waits, for at most ``within_s`` seconds; then that error
    is raised. Use as::

        for attempt in transient_retries(15.0):
            with attempt, service.tx() as session:
                ...  # everything the transaction does, nothing after it in the loop

    The body must be safe to run again: it may change memory only in ways that a rolled-back
    attempt leaves true. PostgreSQL's own advice for 40001/40P01 is exactly this, and oslo.db's
    ``wrap_db_retry`` does the same for Nova. A COMMIT whose connection dies leaves its outcome
    unknown; callers whose rows have a known identity check for them on the next attempt.
    """

    def said(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.info(
            "transient database failure (attempt %d), running the transaction again: %s",
            state.attempt_number,
            error,
        )

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(StoreUnavailable),
        stop=tenacity.stop_after_delay(within_s),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
        before_sleep=said,
        sleep=sleep,
        reraise=True,
    )


__all__ = ["transient_retries", "translate", "typed_database_errors"]
