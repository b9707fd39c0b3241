"""Disk images with ``qemu-img``: create, info, convert, resize (the ops notes' qemu-img commands).

``qemu-img`` runs as a subprocess with an argument list (never a shell). Its JSON output is parsed by
the pure :func:`parse_info`. Failures become :class:`~common.errors.StorageError` with qemu-img's own
message; a missing binary is :class:`~common.errors.Unsupported`.

Nothing here ever overwrites an image: ``create`` reserves the file with ``O_EXCL`` first and
``convert`` writes a temporary file next to the destination and links it into place only if the
destination still does not exist.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Sequence

from agent.ports import GIB, grown_size
from common.errors import AlreadyExists, NotFound, StorageError, Unsupported
from common.messages.vm import DiskFormat
from common.messages.vmops import ImageInfo

log = logging.getLogger(__name__)


#: Seconds one qemu-img run may take: below the 600 s "slow" class of image.convert.
CONVERT_TIMEOUT_S = 540.0
QUICK_TIMEOUT_S = 60.0

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def parse_info(text: str, path: str) -> ImageInfo:
    """An :class:`ImageInfo` from ``qemu-img info --output=json`` (pure)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"qemu-img info {path}: unreadable output ({exc})") from None
    if not isinstance(data, dict):
        raise StorageError(f"qemu-img info {path}: expected a JSON object")
    fmt = data.get("format")
    virtual = data.get("virtual-size")
    if not isinstance(fmt, str) or not isinstance(virtual, int):
        raise StorageError(f"qemu-img info {path}: no format or virtual size in its output")
    actual = data.get("actual-size")
    cluster = data.get("cluster-size")
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    snapshots = data.get("snapshots")
    return ImageInfo(
        path=path,
        format=fmt,
        virtual_size_bytes=virtual,
        actual_size_bytes=actual if isinstance(actual, int) else 0,
        cluster_size=cluster if isinstance(cluster, int) else None,
        backing_file=backing if isinstance(backing, str) else None,
        snapshots=len(snapshots) if isinstance(snapshots, list) else 0,
        dirty=data.get("dirty-flag") is True,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


class QemuImg:
    """The ``qemu-img`` tool of one host."""

    def __init__(self, binary: str = "qemu-img", run: Runner = subprocess.run) -> None:
        self._binary = binary
        self._run = run

    def _call(self, args: Sequence[str], what: str, timeout: float) -> str:
        argv = [self._binary, *args]
        try:
            done = self._run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise Unsupported(
                f"{what}: qemu-img is not installed on this host (apt-get install qemu-utils)"
            ) from None
        except subprocess.TimeoutExpired:
            raise StorageError(
                f"{what}: qemu-img did not finish within {timeout:g} s", retryable=True
            ) from None
        if done.returncode != 0:
            message = _last_line(done.stderr or done.stdout)
            hint = " (is a running VM using it?)" if "lock" in message.lower() else ""
            raise StorageError(f"{what}: {message}{hint}", details={"returncode": done.returncode})
        return str(done.stdout)

    def info(self, path: str) -> ImageInfo:
        """``qemu-img info -U``: -U (force share) reads the metadata of an image a VM has open."""
        if not os.path.exists(path):  # noqa: PTH110 - str paths throughout
            raise NotFound(f"image {path} does not exist on this host")
        out = self._call(["info", "--output=json", "-U", path], f"qemu-img info {path}", QUICK_TIMEOUT_S)
        return parse_info(out, path)

    def create(self, path: str, fmt: DiskFormat, size_gib: int) -> ImageInfo:
        """Create a new image; AlreadyExists when ``path`` exists (unless it is this very image)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            existing = self.info(path)
            if existing.format == fmt.value and existing.virtual_size_bytes == size_gib * GIB:
                return existing  # a repeated create of the same image
            raise AlreadyExists(
                f"{path} exists already ({existing.format}, {existing.virtual_size_bytes // GIB} GiB); "
                "virtfleet never overwrites an image"
            ) from None
        except FileNotFoundError:
            raise NotFound(f"cannot create {path}: its directory does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror}") from None
        os.close(fd)
        try:
            self._call(
                ["create", "-q", "-f", fmt.value, path, str(size_gib * GIB)],
                f"qemu-img create {path}",
                QUICK_TIMEOUT_S,
            )
        except Exception:
            with contextlib.suppress(OSError):
                os.unlink(path)  # noqa: PTH108
            raise
        log.info("created image %s (%s, %d GiB)", path, fmt.value, size_gib)
        return self.info(path)

    def convert(self, src: str, dst: str, fmt: DiskFormat) -> ImageInfo:
        """``qemu-img convert -O fmt``; the destination appears only when it is complete."""
        source = self.info(src)
        if os.path.lexists(dst):
            raise AlreadyExists(f"{dst} exists already; virtfleet never overwrites an image")
        directory = os.path.dirname(dst)  # noqa: PTH120
        if not os.path.isdir(directory):  # noqa: PTH112
            raise NotFound(f"cannot convert to {dst}: its directory does not exist")
        tmp = os.path.join(directory, f".{os.path.basename(dst)}.part-{uuid.uuid4().hex[:8]}")  # noqa: PTH118, PTH119
        try:
            self._call(
                ["convert", "-q", "-f", source.format, "-O", fmt.value, src, tmp],
                f"qemu-img convert {src} -> {dst}",
                CONVERT_TIMEOUT_S,
            )
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile: never overwrite
            except FileExistsError:
                raise AlreadyExists(
                    f"{dst} appeared while converting; virtfleet never overwrites an image"
                ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # noqa: PTH108
        log.info("converted %s (%s) to %s (%s)", src, source.format, dst, fmt.value)
        return self.info(dst)

    def resize(self, path: str, size_gib: int) -> ImageInfo:
        """Grow an image (``qemu-img resize``); shrinking is refused (it loses data)."""
        current = self.info(path)
        wanted = grown_size(current, size_gib)
        if wanted is None:
            return current
        self._call(
            ["resize", "-q", "-f", current.format, path, str(wanted)],
            f"qemu-img resize {path}",
            QUICK_TIMEOUT_S,
        )
        return self.info(path)
