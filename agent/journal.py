"""The agent's command journal: the reply to every handled command, by message id, in SQLite.

:class:`~common.transport.rpc.Dispatcher` consults it before running a command, so a redelivered
command (the broker redelivers whatever was not acknowledged) is answered with the recorded
reply instead of running again. The first reply recorded for an id wins. Old rows are pruned on
every put: at most ``max_entries`` rows and nothing older than ``max_age_s``.

Durability: WAL with ``synchronous=NORMAL``, not ``FULL`` (an fsync per command was half of the
agent's command path: ``bench/agent_journal.py``). A reply is durable against the agent process
dying, whenever it dies. Power loss or a kernel crash may lose the replies committed since the
last checkpoint, never corrupt the database. What such a lost row costs: the broker redelivers a
command that was not acknowledged, and the agent runs it again instead of replaying its reply.

* After a power loss the host rebooted: the redelivered command is minutes old, and every
  request expires after its timeout class (30 s, 120 s, 600 s), so the dispatcher answers
  ``RequestTimeout`` without running it; the journal is not consulted for an answer it must keep.
* A command younger than its timeout runs again, and the handlers are idempotent by VM uuid
  (create: "already defined"; start: "already running"; delete: "not defined"); the few that are
  not (reboot, reset) act on VMs that the power loss switched off, and refuse.
* The controller had no reply either (the host vanished), so its call timed out and it
  reconciles from the agent's first full report after the restart.

A reply acknowledged to the broker is never redelivered, so losing its row matters even less.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import StorageError

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    reply      BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_created_at ON journal (created_at);
"""


class SqliteJournal:
    """Thread-safe (one connection behind a lock) implementation of the ``Journal`` protocol."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
        poll_s: float = 1.0,
    ) -> None:
        """``poll_s``: how often a :meth:`wait_for` looks again without being woken (the clock
        may be injected, so its deadline is checked by looking); a put wakes it at once."""
        if max_entries <= 0 or max_age_s <= 0 or poll_s <= 0:
            raise ValueError("journal limits must be positive")
        self._poll_s = poll_s
        self.path = Path(path)
        self._max_entries = max_entries
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        #: notified at every put, for wait_for
        self._put = threading.Condition(self._lock)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is appended to the WAL without an fsync (checkpoints still
            # fsync). A committed reply survives the agent's process crashing (the WAL is in
            # the OS page cache and is replayed at the next open): the case the journal is for,
            # a command redelivered because the agent died before acknowledging it. Only an OS
            # crash or power loss can lose the last commits; see "Durability" above for why that
            # loses nothing that matters.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the command journal {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"the command journal {self.path} is closed")
        return self._db

    def get(self, message_id: str) -> bytes | None:
        """The recorded reply for ``message_id``, or None."""
        with self._lock:
            return self._get(message_id)

    def wait_for(self, message_id: str, until: float) -> bytes | None:
        """The reply for ``message_id`` once one is recorded, or None if none is by ``until``
        (wall-clock time, as a command's ``expires_at``): how a copy of a command that is still
        running waits for the answer of the first copy."""
        with self._put:
            while True:
                if self._db is None:
                    return None  # closed: the agent stops, and the copy is redelivered to the next
                if (reply := self._get(message_id)) is not None:
                    return reply
                left = until - self._clock()
                if left <= 0:
                    return None
                self._put.wait(min(left, self._poll_s))

    def _get(self, message_id: str) -> bytes | None:
        """As :meth:`get`, with the lock held."""
        try:
            row = (
                self._conn()
                .execute("SELECT reply FROM journal WHERE message_id = ?", (message_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StorageError(f"command journal read failed: {exc}") from exc
        return None if row is None else bytes(row[0])

    def put(self, message_id: str, kind: str, reply: bytes) -> None:
        """Record a reply (the first one for an id is kept) and prune old rows."""
        now = self._clock()
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT OR IGNORE INTO journal (message_id, kind, reply, created_at) VALUES (?, ?, ?, ?)",
                    (message_id, kind, reply, now),
                )
                db.execute("DELETE FROM journal WHERE created_at < ?", (now - self._max_age_s,))
                db.execute(
                    "DELETE FROM journal WHERE seq <= (SELECT MAX(seq) FROM journal) - ?",
                    (self._max_entries,),
                )
                db.execute("COMMIT")
                self._put.notify_all()
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StorageError(f"command journal write failed: {exc}") from exc

    def kind_of(self, message_id: str) -> str | None:
        """The kind recorded for ``message_id`` (for diagnostics and tests)."""
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT kind FROM journal WHERE message_id = ?", (message_id,))
                .fetchone()
            )
        return None if row is None else str(row[0])

    def __len__(self) -> int:
        with self._lock:
            row = self._conn().execute("SELECT COUNT(*) FROM journal").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()
            self._put.notify_all()  # copies waiting in wait_for give up now
