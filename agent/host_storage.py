"""The storage-pool policy applied to one host: what the handlers call before a path reaches a tool.

:class:`HostStorage` joins the pure :class:`~agent.storage_pools.PoolPolicy` (from the agent's
configuration), the host's file system (:class:`~agent.storage_pools.PathLookup`, from the
hypervisor port) and the recorded image formats (:class:`~agent.host_files.FormatBook`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from agent.host_files import FormatBook
from agent.ports import Hypervisor, Images
from agent.storage_pools import ConfinedPath, PathLookup, PoolPolicy, StoragePool
from common.errors import InvalidRequest, NotFound, VirtfleetError
from common.messages.vm import DiskFormat, DiskSpec, VmSpec
from common.messages.vmops import ImageInfo

#: Backing chains longer than this are refused (qemu's own limit is about as deep).
MAX_CHAIN = 16

#: Where a VM's serial console may be logged besides the pools: libvirt's own QEMU log directory.
SERIAL_LOG_POOL = StoragePool("libvirt-logs", "/var/log/libvirt/qemu")


def default_pool(hv: Hypervisor, name: str | None = None) -> StoragePool | None:
    """The libvirt pool ``name`` (the hypervisor's default) as a storage pool; None without one."""
    pool = name or hv.default_pool
    try:
        return StoragePool(pool, hv.pool_path(pool))
    except VirtfleetError:
        return None


class HostStorage:
    """Where commands may touch this host's files, and the format of each image."""

    def __init__(self, policy: PoolPolicy, lookup: PathLookup, formats: FormatBook) -> None:
        self.policy = policy
        self._lookup = lookup
        self.formats = formats

    @classmethod
    def for_host(
        cls,
        hv: Hypervisor,
        pools: Iterable[StoragePool] = (),
        allowed_devices: Iterable[str] = (),
        *,
        default: str | None = None,
        formats_file: Path | None = None,
    ) -> HostStorage:
        """The configured ``pools`` plus the directory of the libvirt pool ``default``."""
        policy = PoolPolicy(tuple(pools), frozenset(allowed_devices))
        libvirt_pool = default_pool(hv, default)
        if libvirt_pool is not None:
            policy = policy.with_pool(libvirt_pool)
        return cls(policy, hv.files(), FormatBook(formats_file))

    def existing(self, path: str, what: str = "image") -> ConfinedPath:
        """An existing file or allowed device inside the pools (InvalidRequest otherwise)."""
        return self.policy.resolve_existing(path, self._lookup, what=what)

    def new(self, path: str, fmt: DiskFormat, what: str = "image") -> ConfinedPath:
        """A path to create an image of ``fmt`` at (it may exist already: the caller decides)."""
        return self.policy.resolve_new(path, self._lookup, fmt, what=what)

    def check_spec_files(self, spec: VmSpec, images: Images) -> None:
        """Every host file a VM spec names lies in a pool: existing disks and CD-ROMs (see
        :meth:`existing_disk`), the kernel and initrd (their existence is libvirt's to check at
        start), the serial log (in a pool or libvirt's QEMU log directory)."""
        for disk in spec.disks:
            if disk.source == "existing":
                self.existing_disk(images, disk)
        if spec.kernel_boot is not None:
            self.policy.resolve(spec.kernel_boot.kernel, self._lookup, what="kernel")
            if spec.kernel_boot.initrd is not None:
                self.policy.resolve(spec.kernel_boot.initrd, self._lookup, what="initrd")
        if spec.serial_log is not None:
            self.policy.with_pool(SERIAL_LOG_POOL).resolve(spec.serial_log, self._lookup, what="serial log")

    def existing_disk(self, images: Images, disk: DiskSpec) -> ConfinedPath:
        """An existing image given to a VM: inside the pools, in a format its pool allows, not a
        format other than the one recorded for it, and (read with that format, as libvirt will)
        with no backing or data file outside the pools. The format is recorded."""
        assert disk.path is not None  # DiskSpec guarantees it for existing images
        what = f"disk {disk.target}"
        fmt = disk.format.value
        confined = self.existing(disk.path, what)
        self.policy.check_format(confined, fmt, what=what)
        recorded = self.formats.get(confined.path)
        if recorded is not None and recorded != fmt:
            raise InvalidRequest(
                f"{what}: {disk.path} is a {recorded} image (as virtfleet made or attached it), not {fmt}",
                details={"path": disk.path, "format": recorded},
            )
        with contextlib.suppress(NotFound):  # a volume only libvirt has (the test driver's): no file to read
            self.inspect(images, confined, what, fmt=fmt)
        self.formats.record(confined.path, fmt)
        return confined

    def pool_volume(self, pool: str, directory: str, volume: str, fmt: DiskFormat) -> str:
        """Check that volume ``volume`` of libvirt pool ``pool`` (in ``directory``) lies in a
        storage pool allowing ``fmt``; its path."""
        return self.new(f"{directory.rstrip('/')}/{volume}", fmt, what=f"volume {pool}/{volume}").path

    def inspect(
        self, images: Images, confined: ConfinedPath, what: str = "image", *, fmt: str | None = None
    ) -> ImageInfo:
        """``qemu-img info`` of an image with ``fmt`` (default: its recorded format); InvalidRequest
        when it (or any image down its backing chain) reads a file outside the pools, or a backing
        file of no stated format (qemu would probe it)."""
        path = confined.path
        fmt = fmt or self.formats.format_of(confined.path)
        first: ImageInfo | None = None
        for _depth in range(MAX_CHAIN):
            facts = images.inspect(path, fmt)
            first = first or facts.info
            if facts.data_file is not None:
                self._referenced(confined.path, facts.data_file, path, "data file")
            if facts.backing_file is None:
                return first
            backing = self._referenced(confined.path, facts.backing_file, path, "backing file")
            if facts.backing_format is None:
                raise InvalidRequest(
                    f"{what} {confined.path}: backing file {facts.backing_file} has no stated format; "
                    "virtfleet does not let qemu guess it",
                )
            path, fmt = backing.path, facts.backing_format
        raise InvalidRequest(f"{what} {confined.path}: backing chain longer than {MAX_CHAIN}")

    def _referenced(self, image: str, name: str, holder: str, role: str) -> ConfinedPath:
        target = name if name.startswith("/") else str(PurePosixPath(holder).parent / name)
        try:
            return self.policy.resolve_existing(target, self._lookup, what=f"{role} of {image}")
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"image {image} refers to {role} {name}, which is not usable: {exc.message}",
                details={"path": image, role.replace(" ", "_"): name},
            ) from None
