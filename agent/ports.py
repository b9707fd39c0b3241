"""The agent's interfaces to effects: what handlers and the reporter need from a hypervisor.

:class:`~agent.drivers.libvirt_driver.LibvirtHypervisor` implements :class:`Hypervisor`;
:class:`~agent.drivers.fake.FakeHypervisor` is a stateful in-memory one with the same refusals
(tests, in-process simulated hosts). Every method raises only virtfleet errors
(:class:`~common.errors.NotFound` for an unknown domain, volume or pool,
:class:`~common.errors.HypervisorUnavailable` while libvirt cannot be reached,
:class:`~common.errors.HypervisorError` for anything libvirt refused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.storage_pools import PathLookup
from common.errors import Conflict, InvalidRequest
from common.messages.host import CpuTopology, StoragePoolInfo
from common.messages.vm import DiskFormat, PowerState, VmStatus
from common.messages.vmops import ImageInfo

#: States in which a domain is running in some form (has a QEMU process).
ACTIVE_STATES = frozenset(
    {PowerState.RUNNING, PowerState.BLOCKED, PowerState.PAUSED, PowerState.SHUTDOWN, PowerState.PMSUSPENDED}
)


GIB = 1024**3


def shutdown_timed_out(uuid: str, timeout_s: float) -> Conflict:
    """What :meth:`Hypervisor.shutdown` raises when the guest is still up after ``timeout_s``
    (and ``force`` was not given)."""
    return Conflict(
        f"VM {uuid} did not shut down within {timeout_s:g} s (the guest ignored ACPI); "
        "retry, or shut down with force",
        retryable=True,
        details={"timeout_s": timeout_s},
    )


def grown_size(image: ImageInfo, size_gib: int) -> int | None:
    """The bytes :meth:`Images.resize` grows ``image`` to; None when it has that size already.

    InvalidRequest for a smaller size: shrinking a disk loses data, so it is never done.
    """
    wanted = size_gib * GIB
    if wanted < image.virtual_size_bytes:
        raise InvalidRequest(
            f"{image.path} is {image.virtual_size_bytes / GIB:g} GiB; shrinking a disk loses data and is not done"
        )
    return None if wanted == image.virtual_size_bytes else wanted


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the hypervisor says about the host, gathered in one go for a report."""

    hostname: str
    hypervisor_type: str  # libvirt's getType(): QEMU, TEST, ...
    hypervisor_version: str
    libvirt_version: str
    cpu: CpuTopology
    memory_mib: int
    free_memory_mib: int  # 0 when the hypervisor cannot tell (the test driver)
    storage: StoragePoolInfo | None
    networks: tuple[str, ...]
    bridges: tuple[str, ...]
    hw_virt: bool


class Hypervisor(Protocol):
    """Operations on one hypervisor host; every domain is named by its uuid."""

    @property
    def default_pool(self) -> str: ...

    def hw_virt(self) -> bool:
        """Whether domain type kvm can run here."""
        ...

    def node_facts(self) -> NodeFacts: ...

    def watch_lifecycle(self, changed: Callable[[str], None]) -> Callable[[], None] | None:
        """Have ``changed(uuid)`` called whenever a domain is defined, undefined, started, stopped,
        paused or resumed, by virtfleet or by anyone else on the host (libvirt's domain lifecycle
        events). It runs on libvirt's event-loop thread, or with the fake's lock held: it must only
        take note and return. Returns how to stop watching; None when this hypervisor emits no
        events (changes made outside virtfleet then wait for the next full report)."""
        ...

    def watch_connection(self, changed: Callable[[str | None], None]) -> Callable[[], None] | None:
        """Have ``changed(reason)`` called when the connection to libvirt is lost (libvirtd
        restarted or stopped: every method then raises
        :class:`~common.errors.HypervisorUnavailable` until it is back) and ``changed(None)`` once
        it is back, after lifecycle watchers were registered again. It must only take note and
        return. Returns how to stop watching; None when the connection cannot be lost."""
        ...

    # -- storage --------------------------------------------------------------------
    def volume_path(self, pool: str, name: str) -> str | None:
        """Path of volume ``name`` in ``pool``, None when there is no such volume."""
        ...

    def create_volume(self, pool: str, name: str, fmt: DiskFormat, size_gib: int) -> str:
        """Create (or reuse, when it exists) a volume; return its path."""
        ...

    def delete_volume(self, pool: str, name: str) -> bool:
        """Delete a volume; False when it did not exist."""
        ...

    def delete_volume_path(self, path: str) -> bool:
        """Delete the storage-pool volume at ``path``; False when no pool volume has that path."""
        ...

    def path_exists(self, path: str) -> bool:
        """True when ``path`` is a pool volume or an existing file on the host."""
        ...

    # -- domains --------------------------------------------------------------------
    def find(self, uuid: str) -> VmStatus | None:
        """The domain's status, or None when there is no domain with that uuid."""
        ...

    def uuid_for_name(self, name: str) -> str | None:
        """The uuid of the domain called ``name``, or None."""
        ...

    def define(self, xml: str) -> str:
        """Define a persistent domain; return its uuid."""
        ...

    def set_owned_volumes(self, uuid: str, paths: tuple[str, ...]) -> None:
        """Remember (in the domain's metadata) which volume paths the agent created for it."""
        ...

    def owned_volumes(self, uuid: str) -> tuple[str, ...]:
        """What :meth:`set_owned_volumes` recorded; () when nothing was."""
        ...

    def start(self, uuid: str) -> None: ...

    def shutdown(self, uuid: str, timeout_s: float, force: bool) -> None:
        """ACPI shutdown and wait for SHUTOFF; after ``timeout_s`` destroy if ``force``, else raise Conflict."""
        ...

    def destroy(self, uuid: str) -> None: ...

    def reboot(self, uuid: str) -> None: ...

    def reset(self, uuid: str) -> None:
        """Hard reset (the guest is not asked); a paused domain stays paused."""
        ...

    def suspend(self, uuid: str) -> None: ...

    def resume(self, uuid: str) -> None: ...

    def undefine(self, uuid: str) -> None:
        """Remove the definition (with managed save, snapshot metadata and NVRAM when present)."""
        ...

    def set_autostart(self, uuid: str, enabled: bool) -> None: ...

    def status(self, uuid: str) -> VmStatus:
        """The domain's status; NotFound when there is none."""
        ...

    def power(self, uuid: str) -> tuple[PowerState, bool]:
        """(state, autostart) of the domain, as :meth:`status` gives them but without reading its
        definition (what a command decides on); NotFound when there is none."""
        ...

    def list_statuses(self) -> tuple[VmStatus, ...]:
        """Every domain on the host, including ones virtfleet did not create (managed=False)."""
        ...

    # -- whole definitions ----------------------------------------------------------
    def domain_xml(self, uuid: str, *, live: bool, secure: bool = False) -> str:
        """The running (``live``) or persistent definition; ``secure`` includes passwords."""
        ...

    def domain_xmls(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """(uuid, name, its XML documents: live or persistent, plus persistent when running) of every domain."""
        ...

    def mark_managed(self, uuid: str) -> None:
        """Add virtfleet's metadata to a domain defined from foreign XML (``vm import``)."""
        ...

    # -- live changes ---------------------------------------------------------------
    def set_vcpus(self, uuid: str, vcpus: int, *, live: bool, config: bool) -> None: ...

    def set_memory(self, uuid: str, memory_mib: int, *, live: bool, config: bool) -> None: ...

    def memory_stats(self, uuid: str) -> dict[str, int]:
        """``virsh dommemstat`` in KiB (``actual`` is the balloon); may be empty."""
        ...

    # -- snapshots ------------------------------------------------------------------
    def create_snapshot(self, uuid: str, xml: str) -> None: ...

    def list_snapshots(self, uuid: str) -> tuple[tuple[str, bool], ...]:
        """(snapshot XML, is current) for each snapshot of the domain."""
        ...

    def revert_snapshot(self, uuid: str, name: str) -> None: ...

    def delete_snapshot(self, uuid: str, name: str) -> None: ...

    # -- devices --------------------------------------------------------------------
    def attach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None: ...

    def detach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None: ...

    def block_size(self, uuid: str, target: str) -> int:
        """Virtual size (bytes) of a running domain's disk."""
        ...

    def block_resize(self, uuid: str, target: str, size_bytes: int) -> None: ...

    # -- storage, networks ----------------------------------------------------------
    def pool_path(self, pool: str) -> str:
        """The directory of a storage pool."""
        ...

    def refresh_pool(self, pool: str) -> None: ...

    def files(self) -> PathLookup:
        """The host's file system as the storage-pool policy sees it (real paths, file kinds)."""
        ...

    def is_pool_volume(self, path: str) -> bool: ...

    def network_exists(self, name: str) -> bool: ...

    def bridge_exists(self, name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """``qemu-img info`` of an image read with a given format, and the files it makes qemu read."""

    info: ImageInfo
    #: the backing file as the image names it (relative names are relative to its directory)
    backing_file: str | None = None
    #: the backing file's format as the image states it (None: qemu would probe it)
    backing_format: str | None = None
    #: a qcow2 external data file, as the image names it
    data_file: str | None = None


class Images(Protocol):
    """Disk image files (``qemu-img``); :class:`~agent.drivers.images.QemuImg` implements it.

    Every method gets the image's format (``-f``): nothing here ever probes one.
    """

    def inspect(self, path: str, fmt: str) -> ImageFacts:
        """``qemu-img info -f fmt``; NotFound when there is no such file."""
        ...

    def create(self, path: str, fmt: DiskFormat, size_gib: int) -> ImageInfo:
        """Never overwrites: AlreadyExists when ``path`` exists. The file is made 0600."""
        ...

    def convert(self, src: str, src_fmt: str, dst: str, fmt: DiskFormat) -> ImageInfo:
        """AlreadyExists when ``dst`` exists; ``dst`` is made 0600 and appears only complete."""
        ...

    def resize(self, path: str, fmt: str, size_gib: int) -> ImageInfo:
        """Grow only."""
        ...
