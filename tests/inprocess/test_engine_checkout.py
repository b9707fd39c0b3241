"""Pooled PostgreSQL connections whose session the server ended are replaced at checkout
(controller.db.engine: a poll of the socket, and the ping only when the server spoke)."""

from __future__ import annotations

from typing import Any

import pytest
from inproc import database_is_postgres
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool
from vfsupport import wait_until

from controller.db import engine as engine_module
from controller.db.engine import has_unread_input

BOUND_S = 30.0

pytestmark = pytest.mark.skipif(
    not database_is_postgres(), reason="PostgreSQL only: a SQLite file has no server session to end"
)


def _one_connection(engine: Engine) -> Engine:
    """``engine`` with an empty pool (migrations left several connections): from here on every
    checkout hands out the one connection the first one opens."""
    engine.dispose()
    return engine


def _backend(engine: Engine) -> tuple[int, Any]:
    """The server pid of the pooled connection a checkout gives, and that DBAPI connection."""
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        return int(pid), conn.connection.dbapi_connection


def test_an_idle_pooled_connection_has_nothing_to_read(engine: Engine) -> None:
    pid, raw = _backend(_one_connection(engine))
    assert not has_unread_input(raw)
    assert _backend(engine)[0] == pid  # and the pool hands the same session out again


def test_a_connection_whose_session_the_server_ended_is_replaced_before_it_is_used(engine: Engine) -> None:
    pid, raw = _backend(_one_connection(engine))
    outside = create_engine(engine.url, poolclass=NullPool)
    try:
        with outside.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        outside.dispose()
    wait_until(lambda: has_unread_input(raw), BOUND_S, "the server's goodbye on the pooled connection")
    # The next checkout finds it, replaces it, and the statement runs: no error reaches the caller.
    new_pid, _raw = _backend(engine)
    assert new_pid != pid


def test_a_connection_idle_long_in_the_pool_is_pinged_at_checkout(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that vanished without a word leaves nothing to read on the socket: a connection
    idle for PING_AFTER_IDLE_S is pinged anyway (here made 0, so every checkout of a pooled one)."""
    pings: list[object] = []
    real_ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return bool(real_ping(dbapi_connection))

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    _backend(_one_connection(engine))  # a fresh connection: never idle in the pool, no ping
    assert pings == []
    _backend(engine)  # back from the pool at once: idle less than PING_AFTER_IDLE_S
    assert pings == []
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.0)
    _backend(engine)
    assert len(pings) == 1
