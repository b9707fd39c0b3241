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
    Written whole to a temporary file and renamed, so a crash leaves the old or the new record.
    """

    def __init__(self, file: Path | None = None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._formats: dict[str, str] = {}
        if file is not None and file.exists():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                # Safe either way: an image with no record is read as raw, never interpreted.
                log.warning("image format record %s unreadable (%s): every image reads as raw", file, exc)
                data = {}
            if isinstance(data, dict):
                self._formats = {str(k): str(v) for k, v in data.items()}

    def get(self, path: str) -> str | None:
        with self._lock:
            return self._formats.get(path)

    def format_of(self, path: str) -> str:
        """The recorded format, else raw (never probed)."""
        return self.get(path) or UNRECORDED_FORMAT

    def record(self, path: str, fmt: str) -> None:
        with self._lock:
            if self._formats.get(path) == fmt:
                return
            self._formats[path] = fmt
            self._save()

    def forget(self, path: str) -> None:
        with self._lock:
            if self._formats.pop(path, None) is not None:
                self._save()

    def _save(self) -> None:
        if self._file is None:
            return
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
