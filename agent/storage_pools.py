"""Which host paths a command may touch: the storage pools of the agent's configuration.

Every path a command names (an image, a disk, a CD-ROM, a kernel) is resolved here before any
tool sees it. The policy is pure: what the file system says about a path (its real path, and what
its last component is, without following it) comes from a :class:`PathLookup` the caller injects
(:class:`agent.host_files.OsPathLookup` on a real host, the fake host's files in tests).

A path is accepted when

* it is absolute and has no ``..`` component;
* it lies, as written, inside a pool's directory (checked before the file system is asked
  anything, so that a refusal never tells whether a file outside the pools exists);
* its real path lies inside the same pool (no symlink in a parent escapes it);
* its last component is not a symlink;
* it is not a block or character device, unless the pool allows devices or the path is on the
  configured device allow-list (``allowed_devices``, checked on the real path).

Refusals are :class:`~common.errors.InvalidRequest` (exit 2) naming the path and the pools.
"""

from __future__ import annotations

import os.path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from common.errors import InvalidRequest, NotFound
from common.messages.vm import DiskFormat
from common.validation import check_name

ALL_FORMATS = frozenset(DiskFormat)


class FileKind(StrEnum):
    """What a path's last component is, not following a symlink (``lstat``)."""

    MISSING = "missing"
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    BLOCK = "block device"
    CHAR = "character device"
    OTHER = "other"


class PathLookup(Protocol):
    """What the host's file system says about a path."""

    def realpath(self, path: str) -> str:
        """The path with every symlink resolved (missing components kept as written)."""
        ...

    def kind(self, path: str) -> FileKind:
        """The last component's kind, without following it."""
        ...


@dataclass(frozen=True, slots=True)
class StoragePool:
    """A directory the agent may create, read and write images in."""

    name: str
    directory: str
    formats: frozenset[DiskFormat] = ALL_FORMATS
    #: block and character devices inside the directory are usable (e.g. a /dev/vg0 pool)
    devices: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "storage pool")
        if not self.directory.startswith("/") or ".." in self.directory.split("/"):
            raise InvalidRequest(
                f"storage pool {self.name}: directory must be an absolute path without '..', "
                f"got {self.directory!r}"
            )
        object.__setattr__(self, "directory", os.path.normpath(self.directory))

    def contains(self, path: str) -> bool:
        """``path`` (normalised) is strictly inside the directory."""
        return _inside(path, self.directory)


@dataclass(frozen=True, slots=True)
class ConfinedPath:
    """A path the policy accepted: its real path, its pool (None: an allow-listed device) and kind."""

    path: str
    pool: StoragePool | None
    kind: FileKind


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """The storage pools of one host and its device allow-list."""

    pools: tuple[StoragePool, ...]
    allowed_devices: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidRequest(f"storage pool(s) declared twice: {', '.join(twice)}")

    def describe(self) -> str:
        """The pools for an error message: ``default (/var/lib/libvirt/images), iso (/srv/iso)``."""
        listed = ", ".join(f"{p.name} ({p.directory})" for p in self.pools) or "none configured"
        return f"the storage pools of this host: {listed}"

    def with_pool(self, pool: StoragePool) -> PoolPolicy:
        """This policy with ``pool`` too (unless a pool of that name is declared already)."""
        if any(p.name == pool.name for p in self.pools):
            return self
        return PoolPolicy((*self.pools, pool), self.allowed_devices)

    def pool(self, name: str) -> StoragePool:
        """The pool called ``name``; InvalidRequest when this host has none."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise InvalidRequest(f"storage pool {name} is not one of {self.describe()}")

    def _pool_of(self, path: str) -> StoragePool | None:
        # The deepest pool wins when pools nest: its rules are the more specific.
        inside = [p for p in self.pools if p.contains(path)]
        return max(inside, key=lambda p: len(p.directory)) if inside else None

    def resolve(self, path: str, lookup: PathLookup, *, what: str = "path") -> ConfinedPath:
        """The checked real path of ``path`` (which may not exist yet: see :meth:`resolve_new`)."""
        if not path.startswith("/"):
            raise InvalidRequest(f"{what} {path!r} must be an absolute path inside {self.describe()}")
        if ".." in path.split("/"):
            raise InvalidRequest(f"{what} {path}: '..' is not allowed; name a path inside {self.describe()}")
        written = os.path.normpath(path)
        device_allowed = written in self.allowed_devices
        pool = self._pool_of(written)
        if pool is None and not device_allowed:
            # Decided on the string alone: the answer is the same whether the file exists or not.
            raise InvalidRequest(
                f"{what} {path} is outside {self.describe()}",
                details={"path": path, "pools": [p.name for p in self.pools]},
            )
        real = os.path.normpath(lookup.realpath(written))
        if device_allowed:
            # A configured device (trusted: the operator wrote it), followed like /dev/vg0/lv links.
            kind = lookup.kind(real)
            if kind not in (FileKind.BLOCK, FileKind.CHAR):
                raise InvalidRequest(
                    f"{what} {path} is in allowed_devices but is not a device ({kind.value})"
                )
            return ConfinedPath(real, None, kind)
        kind = lookup.kind(written)
        if kind is FileKind.SYMLINK:
            raise InvalidRequest(f"{what} {path} is a symbolic link; name the file itself")
        if pool is None or not _inside(real, os.path.normpath(lookup.realpath(pool.directory))):
            raise InvalidRequest(
                f"{what} {path} resolves to {real}, outside its storage pool "
                f"{pool.name if pool else '(none)'}: symbolic links may not leave a pool",
                details={"path": path},
            )
        if kind in (FileKind.BLOCK, FileKind.CHAR) and not pool.devices:
            raise InvalidRequest(
                f"{what} {path} is a {kind.value}; storage pool {pool.name} does not allow devices "
                "(devices = true in its configuration, or list it in allowed_devices)"
            )
        if kind in (FileKind.DIRECTORY, FileKind.OTHER):
            raise InvalidRequest(f"{what} {path} is a {kind.value}, not an image")
        return ConfinedPath(real, pool, kind)

    def resolve_existing(self, path: str, lookup: PathLookup, *, what: str = "image") -> ConfinedPath:
        """:meth:`resolve`, and NotFound when nothing is there (inside a pool: telling so leaks
        nothing the pool's users may not know)."""
        confined = self.resolve(path, lookup, what=what)
        if confined.kind is FileKind.MISSING:
            raise NotFound(f"{what}: image {path} does not exist on this host", details={"path": path})
        return confined

    def resolve_new(
        self, path: str, lookup: PathLookup, fmt: DiskFormat, *, what: str = "image"
    ) -> ConfinedPath:
        """:meth:`resolve` for a file about to be created in a pool that allows ``fmt``."""
        confined = self.resolve(path, lookup, what=what)
        pool = confined.pool
        if pool is None:
            raise InvalidRequest(f"{what} {path}: new images are created inside a storage pool only")
        if fmt not in pool.formats:
            allowed = ", ".join(sorted(f.value for f in pool.formats))
            raise InvalidRequest(
                f"{what} {path}: storage pool {pool.name} allows only {allowed}, not {fmt.value}"
            )
        return confined

    def check_format(self, confined: ConfinedPath, fmt: str, *, what: str = "image") -> None:
        """InvalidRequest when ``confined``'s pool does not allow format ``fmt``."""
        pool = confined.pool
        if pool is not None and fmt not in {f.value for f in pool.formats}:
            allowed = ", ".join(sorted(f.value for f in pool.formats))
            raise InvalidRequest(
                f"{what} {confined.path}: storage pool {pool.name} allows only {allowed}, not {fmt}"
            )


def _inside(path: str, directory: str) -> bool:
    return path != directory and path.startswith(directory.rstrip("/") + "/")


def _formats(name: str, value: Any) -> frozenset[DiskFormat]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f'config pools.{name}.formats: expected a non-empty list such as ["qcow2"]')
    try:
        return frozenset(DiskFormat(v) for v in value)
    except ValueError:
        known = ", ".join(f.value for f in DiskFormat)
        raise InvalidRequest(
            f"config pools.{name}.formats: expected some of {known}, got {value!r}"
        ) from None


def parse_pools(value: Any) -> tuple[StoragePool, ...]:
    """The ``[agent.pools.NAME]`` tables of the config file::

    [agent.pools.iso]
    path = "/srv/iso"
    formats = ["raw"]      # default: every format
    devices = false        # default
    """
    if not isinstance(value, Mapping):
        raise InvalidRequest("config pools: expected tables [agent.pools.NAME] with a path")
    pools = []
    for name, table in value.items():
        if not isinstance(table, Mapping):
            raise InvalidRequest(f"config pools.{name}: expected a table with a path")
        unknown = sorted(set(table) - {"path", "formats", "devices"})
        if unknown:
            raise InvalidRequest(
                f"config pools.{name}: unknown key(s) {', '.join(unknown)} (path, formats, devices)"
            )
        directory = table.get("path")
        if not isinstance(directory, str):
            raise InvalidRequest(f"config pools.{name}.path: expected an absolute directory")
        devices = table.get("devices", False)
        if not isinstance(devices, bool):
            raise InvalidRequest(f"config pools.{name}.devices: expected true or false")
        formats = _formats(name, table["formats"]) if "formats" in table else ALL_FORMATS
        pools.append(StoragePool(str(name), directory, formats, devices))
    return tuple(pools)


def parse_devices(value: Any) -> frozenset[str]:
    """``allowed_devices = ["/dev/vg0/db"]``: absolute device paths usable outside any pool."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise InvalidRequest("config allowed_devices: expected a list of absolute device paths")
    if any(".." in v.split("/") for v in value):
        raise InvalidRequest("config allowed_devices: '..' is not allowed")
    return frozenset(os.path.normpath(v) for v in value)


def policy(pools: Iterable[StoragePool], allowed_devices: Iterable[str] = ()) -> PoolPolicy:
    """A :class:`PoolPolicy` of ``pools``."""
    return PoolPolicy(tuple(pools), frozenset(allowed_devices))
