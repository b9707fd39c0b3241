"""Disk images with ``qemu-img``: create, info, convert, resize (the ops notes' qemu-img commands).

``qemu-img`` runs as a subprocess with an argument list (never a shell). Its JSON output is parsed by
the pure :func:`parse_info`. Failures become :class:`~common.errors.StorageError` with qemu-img's own
message; a missing binary is :class:`~common.errors.Unsupported`.

Nothing here ever overwrites an image: ``create`` reserves the file with ``O_EXCL | O_NOFOLLOW``
(mode 0600) first and ``convert`` writes into such a temporary file next to the destination
(``qemu-img create`` then ``convert -n``, so qemu never creates a file with its own mode) and links
it into place only if the destination still does not exist. Every call passes the image's format
with ``-f``: qemu-img never probes one. Which paths may be used is decided before, by
:class:`agent.host_storage.HostStorage`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Sequence

from agent.host_files import create_exclusive
from agent.ports import GIB, ImageFacts, grown_size
from common.errors import AlreadyExists, NotFound, StorageError, Unsupported
from common.messages.vm import DiskFormat
from common.messages.vmops import ImageInfo

log = logging.getLogger(__name__)


#: Seconds one qemu-img run may take: below the 600 s "slow" class of image.convert.
CONVERT_TIMEOUT_S = 540.0
QUICK_TIMEOUT_S = 60.0

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def parse_info(text: str, path: str) -> ImageFacts:
    """An image's facts from ``qemu-img info --output=json`` (pure)."""
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
    specific = data.get("format-specific")
    specific_data = specific.get("data") if isinstance(specific, dict) else None
    data_file = specific_data.get("data-file") if isinstance(specific_data, dict) else None
    raw_backing = data.get("backing-filename")
    backing_format = data.get("backing-filename-format")
    info = ImageInfo(
        path=path,
        format=fmt,
        virtual_size_bytes=virtual,
        actual_size_bytes=actual if isinstance(actual, int) else 0,
        cluster_size=cluster if isinstance(cluster, int) else None,
        backing_file=backing if isinstance(backing, str) else None,
        snapshots=len(snapshots) if isinstance(snapshots, list) else 0,
        dirty=data.get("dirty-flag") is True,
    )
    return ImageFacts(
        info,
        backing_file=backing
        if isinstance(backing, str)
        else (raw_backing if isinstance(raw_backing, str) else None),
        backing_format=backing_format if isinstance(backing_format, str) else None,
        data_file=data_file if isinstance(data_file, str) else None,
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

    def inspect(self, path: str, fmt: str) -> ImageFacts:
        """``qemu-img info -f FMT -U``: -U (force share) reads the metadata of an image a VM has
        open; info never opens a backing file."""
        if not os.path.lexists(path):
            raise NotFound(f"image {path} does not exist on this host")
        out = self._call(
            ["info", "--output=json", "-f", fmt, "-U", path], f"qemu-img info {path}", QUICK_TIMEOUT_S
        )
        return parse_info(out, path)

    def info(self, path: str, fmt: str) -> ImageInfo:
        return self.inspect(path, fmt).info

    def create(self, path: str, fmt: DiskFormat, size_gib: int) -> ImageInfo:
        """Create a new image (mode 0600); AlreadyExists when anything is at ``path``."""
        create_exclusive(path)
        try:
            self._call(
                ["create", "-q", "-f", fmt.value, path, str(size_gib * GIB)],
                f"qemu-img create {path}",
                QUICK_TIMEOUT_S,
            )
        except Exception:
            with contextlib.suppress(OSError):
                os.unlink(path)  # noqa: PTH108 - str paths throughout
            raise
        log.info("created image %s (%s, %d GiB)", path, fmt.value, size_gib)
        return self.info(path, fmt.value)

    def convert(self, src: str, src_fmt: str, dst: str, fmt: DiskFormat) -> ImageInfo:
        """``qemu-img convert -f SRC_FMT -O fmt``; the destination (0600) appears only complete."""
        source = self.info(src, src_fmt)
        if os.path.lexists(dst):
            raise AlreadyExists(f"{dst} exists already; virtfleet never overwrites an image")
        directory = os.path.dirname(dst)  # noqa: PTH120
        if not os.path.isdir(directory):  # noqa: PTH112
            raise NotFound(f"cannot convert to {dst}: its directory does not exist")
        tmp = os.path.join(directory, f".{os.path.basename(dst)}.part-{uuid.uuid4().hex[:8]}")  # noqa: PTH118, PTH119
        create_exclusive(tmp)
        try:
            what = f"qemu-img convert {src} -> {dst}"
            # Formatted in our own 0600 file, then filled with -n: qemu-img would otherwise create
            # the destination itself with its default mode (0644), readable by every user.
            self._call(
                ["create", "-q", "-f", fmt.value, tmp, str(source.virtual_size_bytes)], what, QUICK_TIMEOUT_S
            )
            self._call(
                ["convert", "-q", "-n", "-f", src_fmt, "-O", fmt.value, src, tmp], what, CONVERT_TIMEOUT_S
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
        log.info("converted %s (%s) to %s (%s)", src, src_fmt, dst, fmt.value)
        return self.info(dst, fmt.value)

    def resize(self, path: str, fmt: str, size_gib: int) -> ImageInfo:
        """Grow an image (``qemu-img resize``); shrinking is refused (it loses data)."""
        current = self.info(path, fmt)
        wanted = grown_size(current, size_gib)
        if wanted is None:
            return current
        self._call(
            ["resize", "-q", "-f", fmt, path, str(wanted)],
            f"qemu-img resize {path}",
            QUICK_TIMEOUT_S,
        )
        return self.info(path, fmt)
