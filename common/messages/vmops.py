"""VM operations beyond create/start/stop/delete: every operation of the ops notes.

Two routes, one module: the controller -> agent commands (``vm.*``, ``image.*``) and the
client -> controller calls (``api.vm.*``, ``api.image.*``) that wrap them. :data:`KINDS` is
merged into :mod:`common.messages.catalogue`; docs/operations.md maps each kind to the
``virsh`` / ``qemu-img`` command it replaces.

Conventions
    * ``live`` / ``config`` on device changes follow ``virsh attach-device``: ``live`` changes
      the running domain, ``config`` its persistent definition. ``live=None`` means "if it
      runs"; asking for ``live=True`` on a shut-off VM is a Conflict.
    * An image is named either by an absolute ``path`` on the host or by a ``volume`` in a
      storage ``pool`` (the host's default pool when ``pool`` is None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidRequest
from common.messages.api import VmActionDone, VmCreated, VmRefRequest
from common.messages.kinds import Kind, Route, Timeout, kind
from common.messages.vm import (
    CacheMode,
    DiskBus,
    DiskFormat,
    DiskSpec,
    IoMode,
    NicKind,
    NicModel,
    NicSpec,
    VmAction,
    VmRef,
    VmResult,
    VmStatus,
)
from common.validation import check_host_id, check_mac, check_name, check_positive

FAMILY_VERSION = "1.0"

_TARGET_RE = re.compile(r"(vd|sd|hd|xvd)[a-z]{1,2}")
_VOLUME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def check_target(value: str) -> str:
    """A guest disk name such as vdb, sdc or hda."""
    if not _TARGET_RE.fullmatch(value):
        raise InvalidRequest(f"invalid disk target {value!r}: expected a name like vdb, sdb or hdc")
    return value


def check_absolute_path(value: str, what: str) -> str:
    """An absolute, normalised host path (no '..', no NUL, no trailing slash)."""
    parts = value.split("/")
    if (
        not value.startswith("/")
        or "\x00" in value
        or any(p in {".", ".."} for p in parts)
        or value.endswith("/")
        or "//" in value
    ):
        raise InvalidRequest(f"{what} must be an absolute, normalised path, got {value!r}")
    return value


def _check_scope(live: bool | None, config: bool) -> None:
    if live is False and not config:
        raise InvalidRequest("nothing to change: neither the running VM (live) nor its definition (config)")


# ====================================================================== agent commands


@dataclass(frozen=True, slots=True)
class DefineVm:
    """``vm.define``: define a persistent domain from libvirt XML (``virsh define backup.xml``).

    ``uuid`` and ``name`` must be those in ``xml`` (the controller parsed it). Idempotent by uuid:
    defining the same domain again just rewrites its definition.
    """

    uuid: str
    name: str
    xml: str
    allow_shared_disk: bool = False
    start: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if not self.xml.strip():
            raise InvalidRequest("the domain XML is empty")


@dataclass(frozen=True, slots=True)
class DumpXml:
    """``vm.dumpxml``: the domain's XML; the persistent definition unless ``live``.

    ``secure`` includes secrets such as the VNC password (``virsh dumpxml --security-info``).
    """

    vm: VmRef
    secure: bool = False
    live: bool = False


@dataclass(frozen=True, slots=True)
class DomainXml:
    xml: str


@dataclass(frozen=True, slots=True)
class ConsoleInfo:
    """``vm.console``: the graphical console as the running domain has it (live XML)."""

    type: str | None  # vnc, spice, or None when the VM has no graphics
    listen: str | None
    port: int | None  # None: automatic and the VM is not running (no port yet)
    autoport: bool
    password_set: bool
    running: bool


@dataclass(frozen=True, slots=True)
class SnapshotCreate:
    """``vm.snapshot.create``: an internal snapshot (disks and, when running, memory). Needs qcow2 disks."""

    vm: VmRef
    name: str
    description: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, "snapshot name")


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """``vm.snapshot.revert`` / ``vm.snapshot.delete``."""

    vm: VmRef
    name: str

    def __post_init__(self) -> None:
        check_name(self.name, "snapshot name")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One row of ``virsh snapshot-list`` (plus ``snapshot-info``)."""

    name: str
    created_at: float
    state: str  # the domain's state when it was taken
    description: str = ""
    current: bool = False
    parent: str | None = None
    memory: bool = False  # RAM saved too: reverting resumes the guest where it was


@dataclass(frozen=True, slots=True)
class SnapshotResult:
    """Reply to the snapshot commands: the VM afterwards and its snapshots."""

    status: VmStatus | None
    snapshots: tuple[SnapshotInfo, ...] = ()
    message: str = ""


@dataclass(frozen=True, slots=True)
class SetVcpus:
    """``vm.set_vcpus``: ``virsh setvcpus N --live --config``; a running VM can only gain vCPUs."""

    vm: VmRef
    vcpus: int

    def __post_init__(self) -> None:
        check_positive(self.vcpus, "vcpus")


@dataclass(frozen=True, slots=True)
class SetMemory:
    """``vm.set_memory``: the balloon target (``virsh setmem``, the notes' ``balloon`` monitor command)."""

    vm: VmRef
    memory_mib: int

    def __post_init__(self) -> None:
        check_positive(self.memory_mib, "memory (MiB)")


@dataclass(frozen=True, slots=True)
class MemStat:
    """``vm.memstat``: ``info balloon`` (``actual``) and the rest of ``virsh dommemstat``, in KiB."""

    status: VmStatus
    balloon_kib: int | None  # the balloon's current size; None when the VM is not running
    stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class DiskAttach:
    """``vm.disk.attach``: a data disk, new (created in a pool) or an existing image."""

    vm: VmRef
    disk: DiskSpec
    live: bool | None = None
    config: bool = True
    allow_shared_disk: bool = False

    def __post_init__(self) -> None:
        check_target(self.disk.target)
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class DiskDetach:
    """``vm.disk.detach``: detach by target; the image is kept unless ``delete_volume`` (agent-made only)."""

    vm: VmRef
    target: str
    live: bool | None = None
    config: bool = True
    delete_volume: bool = False

    def __post_init__(self) -> None:
        check_target(self.target)
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class DiskResize:
    """``vm.disk.resize``: grow a disk image to ``size_gib`` (``virsh blockresize`` / ``qemu-img resize``)."""

    vm: VmRef
    target: str
    size_gib: int

    def __post_init__(self) -> None:
        check_target(self.target)
        check_positive(self.size_gib, "disk size (GiB)")


@dataclass(frozen=True, slots=True)
class NicAttach:
    """``vm.nic.attach``: ``virsh attach-interface``; the controller always sends a MAC."""

    vm: VmRef
    nic: NicSpec
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        if self.nic.mac is None:
            raise InvalidRequest("a NIC to attach needs its MAC address (the controller assigns one)")
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class NicDetach:
    """``vm.nic.detach``: ``virsh detach-interface --mac``."""

    vm: VmRef
    mac: str
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class NicRow:
    """One row of ``virsh domiflist``; ``-`` where virsh prints it."""

    interface: str
    type: str
    source: str
    model: str
    mac: str


@dataclass(frozen=True, slots=True)
class NicList:
    """Reply to ``vm.nic.*``: the interfaces afterwards (the running domain's when it runs)."""

    nics: tuple[NicRow, ...]
    message: str = ""


@dataclass(frozen=True, slots=True)
class ImageLocation:
    """An image on a host: an absolute ``path``, or ``volume`` in ``pool`` (None: the default pool)."""

    path: str | None = None
    volume: str | None = None
    pool: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.volume is None):
            raise InvalidRequest("name an image by an absolute path or by a pool volume name (not both)")
        if self.path is not None:
            check_absolute_path(self.path, "image path")
            if self.pool is not None:
                raise InvalidRequest("a pool goes with a volume name, not with a path")
        if self.volume is not None and (not _VOLUME_RE.fullmatch(self.volume) or self.volume in {".", ".."}):
            raise InvalidRequest(f"invalid volume name {self.volume!r}: 1-128 of A-Z a-z 0-9 _ . + -")
        if self.pool is not None:
            check_name(self.pool, "storage pool")

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return f"{self.pool or '<default pool>'}/{self.volume}"


@dataclass(frozen=True, slots=True)
class ImageCreate:
    """``image.create``: ``qemu-img create -f FORMAT PATH SIZE`` (or a pool volume). Never overwrites."""

    image: ImageLocation
    format: DiskFormat
    size_gib: int

    def __post_init__(self) -> None:
        check_positive(self.size_gib, "image size (GiB)")


@dataclass(frozen=True, slots=True)
class ImageInfoRequest:
    """``image.info``: ``qemu-img info``."""

    image: ImageLocation


@dataclass(frozen=True, slots=True)
class ImageConvert:
    """``image.convert``: ``qemu-img convert -O FORMAT SRC DST``; DST must not exist."""

    source: ImageLocation
    dest: ImageLocation
    format: DiskFormat


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` says about an image."""

    path: str
    format: str
    virtual_size_bytes: int
    actual_size_bytes: int
    cluster_size: int | None = None  # qcow2 only
    backing_file: str | None = None
    snapshots: int = 0  # internal snapshots (qcow2)
    dirty: bool = False


# ====================================================================== client -> controller


@dataclass(frozen=True, slots=True)
class VmAutostartRequest:
    name: str
    enabled: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


@dataclass(frozen=True, slots=True)
class VmExportRequest:
    name: str
    secure: bool = False
    live: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


@dataclass(frozen=True, slots=True)
class VmExport:
    name: str
    host: str
    xml: str


@dataclass(frozen=True, slots=True)
class VmImportRequest:
    """``api.vm.import``: define a VM from libvirt XML, on ``host`` or where the scheduler puts it."""

    xml: str
    host: str | None = None
    start: bool = False
    allow_shared_disk: bool = False

    def __post_init__(self) -> None:
        if not self.xml.strip():
            raise InvalidRequest("the domain XML is empty")
        if self.host is not None:
            check_host_id(self.host)


@dataclass(frozen=True, slots=True)
class ConsoleView:
    name: str
    host: str
    hostname: str
    type: str | None
    listen: str | None
    port: int | None
    password_set: bool
    #: ``host:port`` to give a VNC viewer ("" when there is no port yet)
    address: str


@dataclass(frozen=True, slots=True)
class SnapshotCreateRequest:
    name: str
    snapshot: str
    description: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_name(self.snapshot, "snapshot name")


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    name: str
    snapshot: str

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_name(self.snapshot, "snapshot name")


@dataclass(frozen=True, slots=True)
class SnapshotListView:
    name: str
    snapshots: tuple[SnapshotInfo, ...]
    message: str = ""


@dataclass(frozen=True, slots=True)
class VmSetVcpusRequest:
    name: str
    vcpus: int

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.vcpus, "vcpus")


@dataclass(frozen=True, slots=True)
class VmSetMemoryRequest:
    name: str
    memory_mib: int

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.memory_mib, "memory (MiB)")


@dataclass(frozen=True, slots=True)
class MemStatView:
    name: str
    host: str
    memory_mib: int
    max_memory_mib: int
    balloon_kib: int | None
    stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class VmDiskAttachRequest:
    """A data disk: new (``size_gib`` in the host's pool) or an existing image (``path``)."""

    name: str
    size_gib: int = 0
    path: str | None = None
    format: DiskFormat = DiskFormat.QCOW2
    target: str | None = None  # None: the next free name on the bus (vdb, vdc, ...)
    bus: DiskBus = DiskBus.VIRTIO
    cache: CacheMode = CacheMode.NONE
    io: IoMode | None = None
    readonly: bool = False
    live: bool | None = None
    config: bool = True
    allow_shared_disk: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if (self.path is None) == (self.size_gib == 0):
            raise InvalidRequest("give either the size of a new disk or the path of an existing image")
        if self.size_gib < 0:
            raise InvalidRequest(f"disk size must be positive, got {self.size_gib}")
        if self.path is not None:
            check_absolute_path(self.path, "image path")
        if self.target is not None:
            check_target(self.target)
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class VmDiskDetachRequest:
    name: str
    target: str
    live: bool | None = None
    config: bool = True
    delete_volume: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_target(self.target)
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class VmDiskResizeRequest:
    """Growing a disk is refused unless ``i_know`` (the notes: add a disk instead; back up first)."""

    name: str
    target: str
    size_gib: int
    i_know: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_target(self.target)
        check_positive(self.size_gib, "disk size (GiB)")


@dataclass(frozen=True, slots=True)
class VmNicAttachRequest:
    name: str
    kind: NicKind
    source: str
    model: NicModel = NicModel.VIRTIO
    mac: str | None = None  # None: the controller generates 52:54:00:xx:xx:xx
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        NicSpec(self.kind, self.source, self.model, self.mac)  # same checks as at create
        if self.mac is not None:
            object.__setattr__(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class VmNicDetachRequest:
    name: str
    mac: str
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        object.__setattr__(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


@dataclass(frozen=True, slots=True)
class NicListView:
    name: str
    host: str
    nics: tuple[NicRow, ...]
    message: str = ""


@dataclass(frozen=True, slots=True)
class ImageCreateRequest:
    host: str
    image: ImageLocation
    format: DiskFormat = DiskFormat.QCOW2
    size_gib: int = 0

    def __post_init__(self) -> None:
        check_host_id(self.host)
        check_positive(self.size_gib, "image size (GiB)")


@dataclass(frozen=True, slots=True)
class ImageInfoApiRequest:
    host: str
    image: ImageLocation

    def __post_init__(self) -> None:
        check_host_id(self.host)


@dataclass(frozen=True, slots=True)
class ImageConvertRequest:
    host: str
    source: ImageLocation
    dest: ImageLocation
    format: DiskFormat

    def __post_init__(self) -> None:
        check_host_id(self.host)


@dataclass(frozen=True, slots=True)
class ImageView:
    host: str
    image: ImageInfo
    message: str = ""


# ====================================================================== the kinds

A, C = Route.AGENT, Route.API
F, N, S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW

#: The message kinds of this family (merged into common.messages.catalogue). An API call's timeout
#: class is never shorter than the agent command it wraps.
KINDS: tuple[Kind, ...] = (
    # controller -> agent
    kind("vm.define", A, DefineVm, VmResult, N, "virsh define (vm import)"),
    kind("vm.dumpxml", A, DumpXml, DomainXml, F, "virsh dumpxml [--inactive] [--security-info]"),
    kind("vm.console", A, VmAction, ConsoleInfo, F, "virsh vncdisplay (graphics of the live XML)"),
    kind("vm.snapshot.create", A, SnapshotCreate, SnapshotResult, S, "virsh snapshot-create-as"),
    kind("vm.snapshot.list", A, VmAction, SnapshotResult, F, "virsh snapshot-list"),
    kind("vm.snapshot.revert", A, SnapshotRef, SnapshotResult, S, "virsh snapshot-revert"),
    kind("vm.snapshot.delete", A, SnapshotRef, SnapshotResult, N, "virsh snapshot-delete"),
    kind("vm.set_vcpus", A, SetVcpus, VmResult, N, "virsh setvcpus N --live --config"),
    kind("vm.set_memory", A, SetMemory, VmResult, N, "virsh setmem / qemu-monitor-command balloon"),
    kind("vm.memstat", A, VmAction, MemStat, F, "qemu-monitor-command info balloon / virsh dommemstat"),
    kind("vm.disk.attach", A, DiskAttach, VmResult, N, "virsh attach-disk (new volume or image)"),
    kind("vm.disk.detach", A, DiskDetach, VmResult, N, "virsh detach-disk"),
    kind("vm.disk.resize", A, DiskResize, VmResult, N, "virsh blockresize / qemu-img resize"),
    kind("vm.nic.attach", A, NicAttach, NicList, N, "virsh attach-interface"),
    kind("vm.nic.detach", A, NicDetach, NicList, N, "virsh detach-interface --mac"),
    kind("vm.nic.list", A, VmAction, NicList, F, "virsh domiflist"),
    kind("image.create", A, ImageCreate, ImageInfo, N, "qemu-img create -f raw|qcow2"),
    kind("image.info", A, ImageInfoRequest, ImageInfo, F, "qemu-img info"),
    kind("image.convert", A, ImageConvert, ImageInfo, S, "qemu-img convert -O raw|qcow2"),
    # client -> controller
    kind("api.vm.reboot", C, VmRefRequest, VmActionDone, N, "virtfleet vm reboot"),
    kind("api.vm.suspend", C, VmRefRequest, VmActionDone, F, "virtfleet vm suspend"),
    kind("api.vm.resume", C, VmRefRequest, VmActionDone, F, "virtfleet vm resume"),
    kind("api.vm.autostart", C, VmAutostartRequest, VmActionDone, F, "virtfleet vm autostart"),
    kind("api.vm.console", C, VmRefRequest, ConsoleView, F, "virtfleet vm console"),
    kind("api.vm.export", C, VmExportRequest, VmExport, F, "virtfleet vm export"),
    kind("api.vm.import", C, VmImportRequest, VmCreated, S, "virtfleet vm import"),
    kind(
        "api.vm.snapshot.create",
        C,
        SnapshotCreateRequest,
        SnapshotListView,
        S,
        "virtfleet vm snapshot create",
    ),
    kind("api.vm.snapshot.list", C, VmRefRequest, SnapshotListView, F, "virtfleet vm snapshot list"),
    kind("api.vm.snapshot.revert", C, SnapshotRequest, VmActionDone, S, "virtfleet vm snapshot revert"),
    kind("api.vm.snapshot.delete", C, SnapshotRequest, SnapshotListView, N, "virtfleet vm snapshot delete"),
    kind("api.vm.setvcpus", C, VmSetVcpusRequest, VmActionDone, N, "virtfleet vm setvcpus"),
    kind("api.vm.setmem", C, VmSetMemoryRequest, VmActionDone, N, "virtfleet vm setmem"),
    kind("api.vm.memstat", C, VmRefRequest, MemStatView, F, "virtfleet vm memstat"),
    kind("api.vm.disk.attach", C, VmDiskAttachRequest, VmActionDone, N, "virtfleet vm disk attach"),
    kind("api.vm.disk.detach", C, VmDiskDetachRequest, VmActionDone, N, "virtfleet vm disk detach"),
    kind("api.vm.disk.resize", C, VmDiskResizeRequest, VmActionDone, N, "virtfleet vm disk resize"),
    kind("api.vm.nic.attach", C, VmNicAttachRequest, NicListView, N, "virtfleet vm nic attach"),
    kind("api.vm.nic.detach", C, VmNicDetachRequest, NicListView, N, "virtfleet vm nic detach"),
    kind("api.vm.nic.list", C, VmRefRequest, NicListView, F, "virtfleet vm nic list"),
    kind("api.image.create", C, ImageCreateRequest, ImageView, N, "virtfleet image create"),
    kind("api.image.info", C, ImageInfoApiRequest, ImageView, F, "virtfleet image info"),
    kind("api.image.convert", C, ImageConvertRequest, ImageView, S, "virtfleet image convert"),
)
