"""controller.db.errors: each kind of database error becomes its typed error, without SQL text."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import exc as sa

from common.errors import AlreadyExists, InternalError, InvalidRequest, StoreUnavailable, VirtfleetError
from controller.db.errors import translate, typed_database_errors

STATEMENT = "INSERT INTO vms (name, idempotency_key) VALUES (?, ?)"


class PgError(Exception):
    """A driver error with a SQLSTATE, as psycopg's are."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "typed"),
    [
        (
            sa.IntegrityError(STATEMENT, {}, sqlite3.IntegrityError("UNIQUE constraint failed: vms.name")),
            AlreadyExists,
        ),
        (sa.IntegrityError(STATEMENT, {}, PgError("duplicate key value", "23505")), AlreadyExists),
        (
            sa.IntegrityError(STATEMENT, {}, PgError("violates foreign key constraint", "23503")),
            InvalidRequest,
        ),
        (
            sa.DataError(STATEMENT, {}, PgError("value too long for type character varying(128)", "22001")),
            InvalidRequest,
        ),
        (sa.OperationalError(STATEMENT, {}, PgError("terminating connection", "57P01")), StoreUnavailable),
        (
            sa.OperationalError(STATEMENT, {}, sqlite3.OperationalError("database is locked")),
            StoreUnavailable,
        ),
        (sa.InternalError(STATEMENT, {}, PgError("could not serialize access", "40001")), StoreUnavailable),
        (sa.InterfaceError(STATEMENT, {}, Exception("connection already closed")), StoreUnavailable),
        (sa.TimeoutError("QueuePool limit of size 10 overflow 20 reached"), StoreUnavailable),
        (
            sa.ProgrammingError(STATEMENT, {}, PgError('relation "vms" does not exist', "42P01")),
            InternalError,
        ),
    ],
)
def test_a_database_error_becomes_its_typed_error_without_the_sql(
    error: sa.SQLAlchemyError, typed: type[VirtfleetError]
) -> None:
    with pytest.raises(VirtfleetError) as raised, typed_database_errors():
        raise error
    assert type(raised.value) is typed
    assert raised.value is not None and translate(error).retryable == raised.value.retryable
    assert "INSERT" not in raised.value.message and "vms" not in raised.value.message
    assert raised.value.__cause__ is error  # the log keeps the original


def test_store_unavailable_is_retryable_and_a_refused_value_is_not() -> None:
    lost = translate(sa.OperationalError(STATEMENT, {}, PgError("server closed the connection", "08006")))
    assert lost.retryable is True
    too_long = translate(sa.DataError(STATEMENT, {}, PgError("value too long", "22001")))
    assert too_long.retryable is False


def test_other_errors_pass_untouched() -> None:
    with pytest.raises(AlreadyExists, match="a VM named"), typed_database_errors():
        raise AlreadyExists("a VM named 'x' already exists in the fleet")
