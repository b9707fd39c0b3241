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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

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


__all__ = ["translate", "typed_database_errors"]
