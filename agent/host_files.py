"""The host's files as the storage-pool policy sees them, safe creation, and the recorded formats.

* :class:`OsPathLookup`: :class:`agent.storage_pools.PathLookup` over ``os.path.realpath`` and
  ``os.lstat`` (never following the last component).
* :func:`create_exclusive`: a new file with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, so a
  file (or symlink) put there meanwhile is never opened, and no other user can read the image.
* :class:`FormatBook`: the format of every image virtfleet created, converted or attached, kept
  in the agent's state directory. ``qemu-img`` always gets ``-f`` from here and never probes: a raw
  image whose guest wrote a qcow2 header into it stays raw (the header's backing file is never
  followed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
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

#: The change log of a FormatBook is folded into its file when it has at least this many lines
#: (and more than the record has images).
COMPACT_AFTER = 1000


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
    """Image path -> format, for images virtfleet made or was told the format of.

    ``file`` None keeps the record in memory only (handlers built without a state directory).

    On disk, two files: ``file`` holds the whole record as one JSON object (written to a
    temporary file, fsync'd and renamed, so a crash leaves the old or the new one), and
    ``file.log`` (see :func:`change_log_path`) the changes since, one JSON line ``[path, format]``
    (``[path, null]`` for a forgotten image) each, appended and fsync'd before :meth:`record` or
    :meth:`forget` returns. A change is therefore on disk before the command that made it
    answers, at the cost of one small append, not a rewrite of the whole record: a host with
    thousands of images paid for a rewrite of all of them on every create. Reading applies the
    log to the object in order (last change wins); replaying a change twice gives the same
    record, so a crash anywhere in :meth:`_compact` loses nothing. A line torn by a crash during
    its append is skipped: its change had not been acknowledged (its command had not answered).
    The log is folded into ``file`` when it is longer than the record (and at least
    :data:`COMPACT_AFTER` lines), so the rewrite costs O(1) per change on average.
    """

    def __init__(self, file: Path | None = None) -> None:
        self._file = file
        self._log = change_log_path(file) if file is not None else None
        self._lock = threading.Lock()
        self._formats: dict[str, str] = {}
        #: changes in the log file since the last compaction
        self._logged = 0
        #: the log file exists (its name is on disk): no directory fsync at the next append
        self._log_exists = False
        if file is None:
            return
        if file.exists():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                # Safe either way: an image with no record is read as raw, never interpreted.
                log.warning("image format record %s unreadable (%s): every image reads as raw", file, exc)
                data = {}
            if isinstance(data, dict):
                self._formats = {str(k): str(v) for k, v in data.items()}
        self._replay()
        self._compact_if_long()

    def get(self, path: str) -> str | None:
        with self._lock:
            return self._formats.get(path)

    def format_of(self, path: str) -> str:
        """The recorded format, else raw (never probed)."""
        return self.get(path) or UNRECORDED_FORMAT

    def record(self, path: str, fmt: str) -> None:
        """Record ``path`` as an image of ``fmt``; on disk when this returns."""
        with self._lock:
            if self._formats.get(path) == fmt:
                return
            self._append(path, fmt)
            self._formats[path] = fmt
            self._compact_if_long()

    def forget(self, path: str) -> None:
        """Drop the record of ``path`` (its image was deleted); on disk when this returns."""
        with self._lock:
            if path not in self._formats:
                return
            self._append(path, None)
            del self._formats[path]
            self._compact_if_long()

    def _replay(self) -> None:
        """Apply the change log to the record read from ``file``."""
        assert self._log is not None
        try:
            data = self._log.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "image format changes %s unreadable (%s): images recorded since are read as raw",
                self._log,
                exc,
            )
            return
        self._log_exists = True
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            # A crash during an append left its line torn (that change was never acknowledged).
            # Cut it off, or the next append would be glued to it and lost with it.
            log.warning("image format changes %s: a torn last line dropped", self._log)
            os.truncate(self._log, complete)
        for number, line in enumerate(data[:complete].splitlines(), 1):
            try:
                path, fmt = json.loads(line)
                if not isinstance(path, str) or not (fmt is None or isinstance(fmt, str)):
                    raise ValueError("not [path, format]")
            except ValueError as exc:
                log.warning("image format changes %s: line %d skipped (%s)", self._log, number, exc)
                continue
            if fmt is None:
                self._formats.pop(path, None)
            else:
                self._formats[path] = fmt
            self._logged += 1

    def _append(self, path: str, fmt: str | None) -> None:
        """One change to the log, on disk (fdatasync) before returning. Called with the lock held."""
        if self._log is None:
            return
        line = (json.dumps([path, fmt], ensure_ascii=True) + "\n").encode("ascii")
        if not self._log_exists:
            self._log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, IMAGE_MODE)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            except OSError:
                # Not recorded (the caller fails): take back what was written, so that neither a
                # change the caller saw fail nor a torn line the next append would be glued to stays.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
        if not self._log_exists:
            _fsync_dir(self._log.parent)  # the new file's name, so that the log is found after a power loss
            self._log_exists = True
        self._logged += 1

    def _compact_if_long(self) -> None:
        if self._logged < max(COMPACT_AFTER, len(self._formats)):
            return
        try:
            self._compact()
        except OSError as exc:
            # Only the cost of reading grows: the log still holds every change, and the next
            # change tries again.
            log.warning("image format record %s not compacted: %s", self._file, exc)

    def _compact(self) -> None:
        """Fold the log into ``file``: write the whole record, and only once its rename is on disk
        empty the log (a crash in between replays changes the record already holds)."""
        assert self._file is not None and self._log is not None
        self._file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._file.parent, prefix=".formats-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self._formats, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(self._file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self._file.parent)
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self._log, 0)
        self._logged = 0


def change_log_path(file: Path) -> Path:
    """The change log beside a :class:`FormatBook` file: ``image-formats.json.log``."""
    return file.with_name(file.name + ".log")


def _fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a new file, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
