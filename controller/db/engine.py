"""Engine creation and schema migration (alembic, run on controller start)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock key that serialises migrations of concurrent controllers.
_MIGRATION_LOCK_KEY = 0x76667431  # "vft1"


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        _private_file(make_url(url).database)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let pysqlite not issue BEGIN itself, so that we can BEGIN IMMEDIATE below.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout
            # instead of failing with "database is locked" when a reader upgrades.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _check_at_checkout(engine)
    return engine


#: A pooled PostgreSQL connection idle this long is pinged at checkout (seconds).
PING_AFTER_IDLE_S = 5.0
#: Where a pooled connection's record keeps when it was last checked in.
_IDLE_SINCE = "virtfleet_idle_since"


def _check_at_checkout(engine: Engine) -> None:
    """Find pooled PostgreSQL connections that died with their server session at checkout, and
    replace them (all those opened before, as ``pool_pre_ping`` does), before any statement fails.

    A server that ends a session (a restart, a failover, ``pg_terminate_backend``) tells its
    client (an error message, then the connection closed), so the socket of a pooled connection
    has something to read only then: a ``poll`` of it, no round trip, decides whether the
    ``SELECT 1`` of ``pool_pre_ping`` is needed. That ping on every checkout was 3 % of the
    controller's CPU in a create burst (and one more round trip per transaction); a connection
    whose server spoke is pinged as before. A server that vanished without a word (a crash or
    power loss, its address moved to a standby) leaves nothing to read: a connection idle in the
    pool for :data:`PING_AFTER_IDLE_S` or more is pinged too, as ``pool_pre_ping`` did. Under
    load, connections go back out within milliseconds and are not pinged.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        idle_long = idle_since is not None and time.monotonic() - idle_since >= PING_AFTER_IDLE_S
        if not idle_long and not has_unread_input(dbapi_connection):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa_exc.InvalidatePoolError(f"the database ended this session: {exc}") from exc


def has_unread_input(dbapi_connection: Any) -> bool:
    """Whether an idle (pooled) DBAPI connection's socket has something to read, or is closed:
    the server spoke although no statement runs, i.e. it ended the session."""
    if getattr(dbapi_connection, "closed", False):
        return True
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # noqa: BLE001  a connection whose socket is gone: as good as closed
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _private_file(database: str | None) -> None:
    """Create the SQLite file readable by its owner only (0600), or make an existing one so.

    The database holds the fleet's state and the audit log; SQLite's -wal and -shm files take
    the database file's mode. PostgreSQL keeps its files private itself.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            log.warning("database %s was mode %o: making it 0600", path, mode)
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        lock_path = Path(database).with_suffix(Path(database).suffix + ".migrate-lock")
        with lock_path.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    yield


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe when several controllers start at once."""
    cfg = alembic_config(engine)
    with _migration_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
