"""The host's files as the storage-pool policy sees them, safe creation, and the recorded formats.

* :class:`OsPathLookup`: :class:`agent.storage_pools.PathLookup` over ``os.path.realpath`` and
  ``os.lstat`` (never following the last component).
* :func:`create_exclusive`: a new file with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, so a
  file (or symlink) put there meanwhile is never opened, and no other user can read the image.
* :class:`FormatBook`: the format of every image virtfleet created, converted or attached, kept
  in an SQLite database in the agent's state directory. ``qemu-img`` always gets ``-f`` from here and never probes: a raw
  image whose guest wrote a qcow2 header into it stays raw (the header's backing file is never
  followed).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path

from agent.storage_pools import FileKind
from common.errors import AlreadyExists, NotFound, StorageError

log = logging.getLogger(__name__)

#: Mode of every image file the agent creates: readable by its owner (root, or libvirt's qemu user
#: after libvirt's DAC relabelling) and nobody else.
IMAGE_MODE = 0o600

#: The format assumed for an image with no record: raw is read as bytes, never interpreted.
UNRECORDED_FORMAT = "raw"


class OsPathLookup:
    """:class:`agent.storage_pools.PathLookup` on this machine's file system."""

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def kind(self, path: str) -> FileKind:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return FileKind.MISSING
        except OSError as exc:
            raise StorageError(f"cannot inspect {path}: {exc.strerror}") from None
        if stat.S_ISLNK(mode):
            return FileKind.SYMLINK
        if stat.S_ISREG(mode):
            return FileKind.FILE
        if stat.S_ISDIR(mode):
            return FileKind.DIRECTORY
        if stat.S_ISBLK(mode):
            return FileKind.BLOCK
        if stat.S_ISCHR(mode):
            return FileKind.CHAR
        return FileKind.OTHER


def create_exclusive(path: str) -> None:
    """Create the empty file ``path`` (mode 0600); AlreadyExists when anything is there, even a
    dangling symlink (``O_EXCL`` with ``O_NOFOLLOW``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, IMAGE_MODE)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists already; virtfleet never overwrites an image") from None
    except FileNotFoundError:
        raise NotFound(f"cannot create {path}: its directory does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, IMAGE_MODE)  # the umask may have taken bits away; never added any
    finally:
        os.close(fd)


class FormatBook:
    """Image path -> format, for images virtfleet made or was told the format of, and for a new
    VM's volume the VM it is made for (its uuid, the *owner*).

    The owner tells a create that finds its volume already there whether that is its own, left
    by an earlier attempt that died (used again), or somebody else's, such as the disk a deleted
    VM of the same name kept (refused: a new VM must never start on an old VM's data).

    ``file`` None keeps the record in memory only (handlers built without a state directory).
    Otherwise ``file`` is an SQLite database (mode 0600) and every change is committed with
    ``synchronous=FULL`` (the write-ahead log fsync'd) before :meth:`record` or :meth:`forget`
    returns: a change is on disk before the command that made it answers, at the cost of one
    small commit. (The earlier record, a JSON object rewritten whole and fsync'd on every change,
    cost a host with thousands of images a rewrite of all of them on every create.) The record
    is also kept in memory, where every read comes from. The open connection costs about
    150 KiB (SQLite's own allocations, not its page cache): nothing on a hypervisor, 150 MiB for
    a simulated fleet of 1,000 hosts in one process (docs/performance.md).

    The JSON record of agents before the database (:data:`LEGACY_SUFFIX` beside ``file``) is
    imported once, when the database is made, and left in place: an older agent started again
    reads it, and reads images recorded since as raw (the safe side).
    """

    def __init__(self, file: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._formats: dict[str, str] = {}
        self._owners: dict[str, str] = {}
        self._db: sqlite3.Connection | None = None
        #: kept on disk (a file was given): a change after close() is refused, not kept in memory only
        self._persistent = file is not None
        if file is None:
            return
        self._db = _open_format_db(file)
        try:
            for path, fmt, owner in self._db.execute("SELECT path, format, owner FROM formats"):
                self._formats[path] = fmt
                if owner is not None:
                    self._owners[path] = owner
        except sqlite3.Error as exc:
            self._db.close()
            raise StorageError(f"cannot read the image format record {file}: {exc}") from None

    def get(self, path: str) -> str | None:
        with self._lock:
            return self._formats.get(path)

    def format_of(self, path: str) -> str:
        """The recorded format, else raw (never probed)."""
        return self.get(path) or UNRECORDED_FORMAT

    def owner(self, path: str) -> str | None:
        """The uuid of the VM that ``path`` was made for as a new volume; None if not one."""
        with self._lock:
            return self._owners.get(path)

    def record(self, path: str, fmt: str, *, owner: str | None = None) -> None:
        """Record ``path`` as an image of ``fmt`` (``owner``: made as a new volume of that VM, see
        :meth:`owner`; None keeps what was recorded); on disk when this returns."""
        with self._lock:
            kept = self._owners.get(path)
            owner = owner or kept
            if self._formats.get(path) == fmt and owner == kept:
                return
            self._write(
                "INSERT OR REPLACE INTO formats (path, format, owner) VALUES (?, ?, ?)", (path, fmt, owner)
            )
            self._formats[path] = fmt
            if owner is not None:
                self._owners[path] = owner

    def forget(self, path: str) -> None:
        """Drop the record of ``path`` (its image was deleted); on disk when this returns."""
        with self._lock:
            if path not in self._formats:
                return
            self._write("DELETE FROM formats WHERE path = ?", (path,))
            del self._formats[path]
            self._owners.pop(path, None)

    def close(self) -> None:
        """Close the database (the agent stops); the record is on disk already."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _write(self, statement: str, params: tuple[str | None, ...]) -> None:
        """One change, committed (and so on disk) before returning; StorageError if not (also
        after :meth:`close`: a command still running as the agent stops must not be told that a
        format it will never find again is recorded)."""
        if self._db is None:
            if self._persistent:
                raise StorageError(
                    "cannot record image formats: the record is closed (the agent is stopping)"
                )
            return
        try:
            with self._db:
                self._db.execute(statement, params)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot record image formats: {exc}") from None


#: The page cache of a format database, KiB (SQLite's default is 2,000).
FORMAT_DB_CACHE_KIB = 16

#: The suffix of the JSON record that agents before the database kept beside it.
LEGACY_SUFFIX = ".json"


def _open_format_db(file: Path) -> sqlite3.Connection:
    """The format database at ``file``, made private (0600) and, when new, filled from the JSON
    record of an earlier agent."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Made 0600 before SQLite opens it: its -wal and -shm files take the database file's mode.
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, IMAGE_MODE))
        db = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open the image format record {file}: {exc}") from None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA cache_size=-{FORMAT_DB_CACHE_KIB}")  # every read is from memory
        with db:
            db.execute("BEGIN IMMEDIATE")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "formats" not in tables:
                db.execute("CREATE TABLE formats (path TEXT PRIMARY KEY, format TEXT NOT NULL, owner TEXT)")
                db.executemany(
                    "INSERT INTO formats (path, format) VALUES (?, ?)",
                    _legacy_record(file.with_suffix(LEGACY_SUFFIX)),
                )
            elif "owner" not in {row[1] for row in db.execute("PRAGMA table_info(formats)")}:
                # The record of an agent before owners: its volumes have none (see FormatBook).
                db.execute("ALTER TABLE formats ADD COLUMN owner TEXT")
    except sqlite3.Error as exc:
        db.close()
        raise StorageError(f"cannot open the image format record {file}: {exc}") from None
    return db


def _legacy_record(file: Path) -> list[tuple[str, str]]:
    """An earlier agent's JSON record (path -> format); empty when absent or unreadable."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        # Safe either way: an image with no record is read as raw, never interpreted.
        log.warning("image format record %s unreadable (%s): its images read as raw", file, exc)
        return []
    return [(str(k), str(v)) for k, v in data.items()] if isinstance(data, dict) else []
