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

from common.errors import InvalidRequest
from common.messages.api import API, VmCreated
from common.messages.base import Message, force_setattr
from common.messages.descriptor import Family, Role, Timeout, Version, api_call, command, query
from common.messages.limits import DiskGiB, MemoryMiB, Name, Path, Text, Token, Vcpus, Xml
from common.messages.vm import (
    VM,
    CacheMode,
    DiskBus,
    DiskFormat,
    DiskSpec,
    IoMode,
    NicKind,
    NicModel,
    NicSpec,
    VmAction,
    VmActionDone,
    VmRef,
    VmRefRequest,
    VmResult,
    VmStatus,
)
from common.validation import check_host_id, check_mac, check_name, check_positive

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


class DefineVm(Message, frozen=True):
    """``vm.define``: define a persistent domain from libvirt XML (``virsh define backup.xml``).

    ``uuid`` and ``name`` must be those in ``xml`` (the controller parsed it). Idempotent by uuid:
    defining the same domain again just rewrites its definition.
    """

    uuid: Token
    name: Name
    xml: Xml
    allow_shared_disk: bool = False
    start: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if not self.xml.strip():
            raise InvalidRequest("the domain XML is empty")


class DumpXml(Message, frozen=True):
    """``vm.dumpxml``: the domain's XML; the persistent definition unless ``live``.

    ``secure`` includes secrets such as the VNC password (``virsh dumpxml --security-info``).
    """

    vm: VmRef
    secure: bool = False
    live: bool = False


class DomainXml(Message, frozen=True):
    xml: str


class ConsoleInfo(Message, frozen=True):
    """``vm.console``: the graphical console as the running domain has it (live XML)."""

    type: str | None  # vnc, spice, or None when the VM has no graphics
    listen: str | None
    port: int | None  # None: automatic and the VM is not running (no port yet)
    autoport: bool
    password_set: bool
    running: bool


class SnapshotCreate(Message, frozen=True):
    """``vm.snapshot.create``: an internal snapshot (disks and, when running, memory). Needs qcow2 disks."""

    vm: VmRef
    name: Name
    description: Text = ""

    def __post_init__(self) -> None:
        check_name(self.name, "snapshot name")


class SnapshotRef(Message, frozen=True):
    """``vm.snapshot.revert`` / ``vm.snapshot.delete``."""

    vm: VmRef
    name: Name

    def __post_init__(self) -> None:
        check_name(self.name, "snapshot name")


class SnapshotInfo(Message, frozen=True):
    """One row of ``virsh snapshot-list`` (plus ``snapshot-info``)."""

    name: str
    created_at: float
    state: str  # the domain's state when it was taken
    description: str = ""
    current: bool = False
    parent: str | None = None
    memory: bool = False  # RAM saved too: reverting resumes the guest where it was


class SnapshotResult(Message, frozen=True):
    """Reply to the snapshot commands: the VM afterwards and its snapshots."""

    status: VmStatus | None
    snapshots: tuple[SnapshotInfo, ...] = ()
    message: str = ""


class SetVcpus(Message, frozen=True):
    """``vm.set_vcpus``: ``virsh setvcpus N --live --config``; a running VM can only gain vCPUs."""

    vm: VmRef
    vcpus: Vcpus

    def __post_init__(self) -> None:
        check_positive(self.vcpus, "vcpus")


class SetMemory(Message, frozen=True):
    """``vm.set_memory``: the balloon target (``virsh setmem``, the notes' ``balloon`` monitor command)."""

    vm: VmRef
    memory_mib: MemoryMiB

    def __post_init__(self) -> None:
        check_positive(self.memory_mib, "memory (MiB)")


class MemStat(Message, frozen=True):
    """``vm.memstat``: ``info balloon`` (``actual``) and the rest of ``virsh dommemstat``, in KiB."""

    status: VmStatus
    balloon_kib: int | None  # the balloon's current size; None when the VM is not running
    stats: dict[str, int]


class DiskAttach(Message, frozen=True):
    """``vm.disk.attach``: a data disk, new (created in a pool) or an existing image."""

    vm: VmRef
    disk: DiskSpec
    live: bool | None = None
    config: bool = True
    allow_shared_disk: bool = False

    def __post_init__(self) -> None:
        check_target(self.disk.target)
        _check_scope(self.live, self.config)


class DiskDetach(Message, frozen=True):
    """``vm.disk.detach``: detach by target; the image is kept unless ``delete_volume`` (agent-made only)."""

    vm: VmRef
    target: Token
    live: bool | None = None
    config: bool = True
    delete_volume: bool = False

    def __post_init__(self) -> None:
        check_target(self.target)
        _check_scope(self.live, self.config)


class DiskResize(Message, frozen=True):
    """``vm.disk.resize``: grow a disk image to ``size_gib`` (``virsh blockresize`` / ``qemu-img resize``)."""

    vm: VmRef
    target: Token
    size_gib: DiskGiB

    def __post_init__(self) -> None:
        check_target(self.target)
        check_positive(self.size_gib, "disk size (GiB)")


class NicAttach(Message, frozen=True):
    """``vm.nic.attach``: ``virsh attach-interface``; the controller always sends a MAC."""

    vm: VmRef
    nic: NicSpec
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        if self.nic.mac is None:
            raise InvalidRequest("a NIC to attach needs its MAC address (the controller assigns one)")
        _check_scope(self.live, self.config)


class NicDetach(Message, frozen=True):
    """``vm.nic.detach``: ``virsh detach-interface --mac``."""

    vm: VmRef
    mac: Token
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        force_setattr(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


class NicRow(Message, frozen=True):
    """One row of ``virsh domiflist``; ``-`` where virsh prints it."""

    interface: str
    type: str
    source: str
    model: str
    mac: str


class NicList(Message, frozen=True):
    """Reply to ``vm.nic.*``: the interfaces afterwards (the running domain's when it runs)."""

    nics: tuple[NicRow, ...]
    message: str = ""


class ImageLocation(Message, frozen=True):
    """An image on a host: an absolute ``path``, or ``volume`` in ``pool`` (None: the default pool)."""

    path: Path | None = None
    volume: Path | None = None
    pool: Token | None = None

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


class ImageCreate(Message, frozen=True):
    """``image.create``: ``qemu-img create -f FORMAT PATH SIZE`` (or a pool volume). Never overwrites."""

    image: ImageLocation
    format: DiskFormat
    size_gib: DiskGiB

    def __post_init__(self) -> None:
        check_positive(self.size_gib, "image size (GiB)")


class ImageInfoRequest(Message, frozen=True):
    """``image.info``: ``qemu-img info``."""

    image: ImageLocation


class ImageConvert(Message, frozen=True):
    """``image.convert``: ``qemu-img convert -O FORMAT SRC DST``; DST must not exist."""

    source: ImageLocation
    dest: ImageLocation
    format: DiskFormat


class ImageInfo(Message, frozen=True):
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


class VmAutostartRequest(Message, frozen=True):
    name: Name
    enabled: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


class VmExportRequest(Message, frozen=True):
    name: Name
    secure: bool = False
    live: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


class VmExport(Message, frozen=True):
    name: str
    host: str
    xml: str


class VmImportRequest(Message, frozen=True):
    """``api.vm.import``: define a VM from libvirt XML, on ``host`` or where the scheduler puts it."""

    xml: Xml
    host: Name | None = None
    start: bool = False
    allow_shared_disk: bool = False

    def __post_init__(self) -> None:
        if not self.xml.strip():
            raise InvalidRequest("the domain XML is empty")
        if self.host is not None:
            check_host_id(self.host)


class ConsoleView(Message, frozen=True):
    name: str
    host: str
    hostname: str
    type: str | None
    listen: str | None
    port: int | None
    password_set: bool
    #: ``host:port`` to give a VNC viewer ("" when there is no port yet)
    address: str


class SnapshotCreateRequest(Message, frozen=True):
    name: Name
    snapshot: Name
    description: Text = ""

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_name(self.snapshot, "snapshot name")


class SnapshotRequest(Message, frozen=True):
    name: Name
    snapshot: Name

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_name(self.snapshot, "snapshot name")


class SnapshotListView(Message, frozen=True):
    name: str
    snapshots: tuple[SnapshotInfo, ...]
    message: str = ""


class VmSetVcpusRequest(Message, frozen=True):
    name: Name
    vcpus: Vcpus

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.vcpus, "vcpus")


class VmSetMemoryRequest(Message, frozen=True):
    name: Name
    memory_mib: MemoryMiB

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.memory_mib, "memory (MiB)")


class MemStatView(Message, frozen=True):
    name: str
    host: str
    memory_mib: int
    max_memory_mib: int
    balloon_kib: int | None
    stats: dict[str, int]


class VmDiskAttachRequest(Message, frozen=True):
    """A data disk: new (``size_gib`` in the host's pool) or an existing image (``path``)."""

    name: Name
    size_gib: DiskGiB = 0
    path: Path | None = None
    format: DiskFormat = DiskFormat.QCOW2
    target: Token | None = None  # None: the next free name on the bus (vdb, vdc, ...)
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


class VmDiskDetachRequest(Message, frozen=True):
    name: Name
    target: Token
    live: bool | None = None
    config: bool = True
    delete_volume: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_target(self.target)
        _check_scope(self.live, self.config)


class VmDiskResizeRequest(Message, frozen=True):
    """Growing a disk is refused unless ``i_know`` (the notes: add a disk instead; back up first)."""

    name: Name
    target: Token
    size_gib: DiskGiB
    i_know: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_target(self.target)
        check_positive(self.size_gib, "disk size (GiB)")


class VmNicAttachRequest(Message, frozen=True):
    name: Name
    kind: NicKind
    source: Token
    model: NicModel = NicModel.VIRTIO
    mac: Token | None = None  # None: the controller generates 52:54:00:xx:xx:xx
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        NicSpec(self.kind, self.source, self.model, self.mac)  # same checks as at create
        if self.mac is not None:
            force_setattr(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


class VmNicDetachRequest(Message, frozen=True):
    name: Name
    mac: Token
    live: bool | None = None
    config: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        force_setattr(self, "mac", check_mac(self.mac))
        _check_scope(self.live, self.config)


class NicListView(Message, frozen=True):
    name: str
    host: str
    nics: tuple[NicRow, ...]
    message: str = ""


class ImageCreateRequest(Message, frozen=True):
    host: Name
    image: ImageLocation
    format: DiskFormat = DiskFormat.QCOW2
    size_gib: DiskGiB = 0

    def __post_init__(self) -> None:
        check_host_id(self.host)
        check_positive(self.size_gib, "image size (GiB)")


class ImageInfoApiRequest(Message, frozen=True):
    host: Name
    image: ImageLocation

    def __post_init__(self) -> None:
        check_host_id(self.host)


class ImageConvertRequest(Message, frozen=True):
    host: Name
    source: ImageLocation
    dest: ImageLocation
    format: DiskFormat

    def __post_init__(self) -> None:
        check_host_id(self.host)


class ImageView(Message, frozen=True):
    host: str
    image: ImageInfo
    message: str = ""


# ====================================================================== the operations

_F, _N, _S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW
_READ, _OPERATE = Role.READER, Role.OPERATOR

#: qemu-img on a host's images (controller -> agent).
IMAGE = Family("image", Version(1, 0), "controller -> agent: disk images on a host (qemu-img)")

# -- controller -> agent (family vm, declared in common.messages.vm)
VM_DEFINE = command(VM, "vm.define", DefineVm, VmResult, _N, "virsh define (vm import)", idempotent=True)
VM_DUMPXML = command(
    VM, "vm.dumpxml", DumpXml, DomainXml, _F, "virsh dumpxml [--inactive] [--security-info]", idempotent=True
)
VM_CONSOLE = command(
    VM,
    "vm.console",
    VmAction,
    ConsoleInfo,
    _F,
    "virsh vncdisplay (graphics of the live XML)",
    idempotent=True,
)
VM_SNAPSHOT_CREATE = command(
    VM, "vm.snapshot.create", SnapshotCreate, SnapshotResult, _S, "virsh snapshot-create-as"
)
VM_SNAPSHOT_LIST = command(
    VM, "vm.snapshot.list", VmAction, SnapshotResult, _F, "virsh snapshot-list", idempotent=True
)
VM_SNAPSHOT_REVERT = command(
    VM, "vm.snapshot.revert", SnapshotRef, SnapshotResult, _S, "virsh snapshot-revert"
)
VM_SNAPSHOT_DELETE = command(
    VM, "vm.snapshot.delete", SnapshotRef, SnapshotResult, _N, "virsh snapshot-delete", idempotent=True
)
VM_SET_VCPUS = command(
    VM, "vm.set_vcpus", SetVcpus, VmResult, _N, "virsh setvcpus N --live --config", idempotent=True
)
VM_SET_MEMORY = command(
    VM,
    "vm.set_memory",
    SetMemory,
    VmResult,
    _N,
    "virsh setmem / qemu-monitor-command balloon",
    idempotent=True,
)
VM_MEMSTAT = command(
    VM,
    "vm.memstat",
    VmAction,
    MemStat,
    _F,
    "qemu-monitor-command info balloon / virsh dommemstat",
    idempotent=True,
)
VM_DISK_ATTACH = command(
    VM, "vm.disk.attach", DiskAttach, VmResult, _N, "virsh attach-disk (new volume or image)"
)
VM_DISK_DETACH = command(VM, "vm.disk.detach", DiskDetach, VmResult, _N, "virsh detach-disk", idempotent=True)
VM_DISK_RESIZE = command(
    VM, "vm.disk.resize", DiskResize, VmResult, _N, "virsh blockresize / qemu-img resize", idempotent=True
)
VM_NIC_ATTACH = command(VM, "vm.nic.attach", NicAttach, NicList, _N, "virsh attach-interface")
VM_NIC_DETACH = command(
    VM, "vm.nic.detach", NicDetach, NicList, _N, "virsh detach-interface --mac", idempotent=True
)
VM_NIC_LIST = command(VM, "vm.nic.list", VmAction, NicList, _F, "virsh domiflist", idempotent=True)
IMAGE_CREATE = command(IMAGE, "image.create", ImageCreate, ImageInfo, _N, "qemu-img create -f raw|qcow2")
IMAGE_INFO = command(IMAGE, "image.info", ImageInfoRequest, ImageInfo, _F, "qemu-img info", idempotent=True)
IMAGE_CONVERT = command(IMAGE, "image.convert", ImageConvert, ImageInfo, _S, "qemu-img convert -O raw|qcow2")

# -- client -> controller (an API call's timeout class is never shorter than the command it wraps)
API_VM_AUTOSTART = api_call(
    API,
    "api.vm.autostart",
    VmAutostartRequest,
    VmActionDone,
    _F,
    "virtfleet vm autostart",
    role=_OPERATE,
    idempotent=True,
)
API_VM_CONSOLE = api_call(
    API,
    "api.vm.console",
    VmRefRequest,
    ConsoleView,
    _F,
    "virtfleet vm console",
    role=_OPERATE,
    idempotent=True,
    read_only=True,
)
API_VM_EXPORT = query(API, "api.vm.export", VmExportRequest, VmExport, "virtfleet vm export")
#: The XML with its secrets (the VNC password): a call of its own, so that only admins may make it.
API_VM_EXPORT_SECURE = api_call(
    API,
    "api.vm.export_secure",
    VmExportRequest,
    VmExport,
    _F,
    "virtfleet vm export --secure",
    role=Role.ADMIN,
    idempotent=True,
    read_only=True,
    since=Version(1, 1),
)
API_VM_IMPORT = api_call(
    API, "api.vm.import", VmImportRequest, VmCreated, _S, "virtfleet vm import", role=_OPERATE
)
API_VM_SNAPSHOT_CREATE = api_call(
    API,
    "api.vm.snapshot.create",
    SnapshotCreateRequest,
    SnapshotListView,
    _S,
    "virtfleet vm snapshot create",
    role=_OPERATE,
)
API_VM_SNAPSHOT_LIST = query(
    API, "api.vm.snapshot.list", VmRefRequest, SnapshotListView, "virtfleet vm snapshot list"
)
API_VM_SNAPSHOT_REVERT = api_call(
    API,
    "api.vm.snapshot.revert",
    SnapshotRequest,
    VmActionDone,
    _S,
    "virtfleet vm snapshot revert",
    role=_OPERATE,
)
API_VM_SNAPSHOT_DELETE = api_call(
    API,
    "api.vm.snapshot.delete",
    SnapshotRequest,
    SnapshotListView,
    _N,
    "virtfleet vm snapshot delete",
    role=_OPERATE,
    idempotent=True,
)
API_VM_SETVCPUS = api_call(
    API,
    "api.vm.setvcpus",
    VmSetVcpusRequest,
    VmActionDone,
    _N,
    "virtfleet vm setvcpus",
    role=_OPERATE,
    idempotent=True,
)
API_VM_SETMEM = api_call(
    API,
    "api.vm.setmem",
    VmSetMemoryRequest,
    VmActionDone,
    _N,
    "virtfleet vm setmem",
    role=_OPERATE,
    idempotent=True,
)
API_VM_MEMSTAT = query(API, "api.vm.memstat", VmRefRequest, MemStatView, "virtfleet vm memstat")
API_VM_DISK_ATTACH = api_call(
    API,
    "api.vm.disk.attach",
    VmDiskAttachRequest,
    VmActionDone,
    _N,
    "virtfleet vm disk attach",
    role=_OPERATE,
)
API_VM_DISK_DETACH = api_call(
    API,
    "api.vm.disk.detach",
    VmDiskDetachRequest,
    VmActionDone,
    _N,
    "virtfleet vm disk detach",
    role=_OPERATE,
    idempotent=True,
)
API_VM_DISK_RESIZE = api_call(
    API,
    "api.vm.disk.resize",
    VmDiskResizeRequest,
    VmActionDone,
    _N,
    "virtfleet vm disk resize",
    role=_OPERATE,
    idempotent=True,
)
API_VM_NIC_ATTACH = api_call(
    API, "api.vm.nic.attach", VmNicAttachRequest, NicListView, _N, "virtfleet vm nic attach", role=_OPERATE
)
API_VM_NIC_DETACH = api_call(
    API,
    "api.vm.nic.detach",
    VmNicDetachRequest,
    NicListView,
    _N,
    "virtfleet vm nic detach",
    role=_OPERATE,
    idempotent=True,
)
API_VM_NIC_LIST = query(API, "api.vm.nic.list", VmRefRequest, NicListView, "virtfleet vm nic list")
API_IMAGE_CREATE = api_call(
    API, "api.image.create", ImageCreateRequest, ImageView, _N, "virtfleet image create", role=Role.ADMIN
)
API_IMAGE_INFO = query(API, "api.image.info", ImageInfoApiRequest, ImageView, "virtfleet image info")
API_IMAGE_CONVERT = api_call(
    API, "api.image.convert", ImageConvertRequest, ImageView, _S, "virtfleet image convert", role=Role.ADMIN
)
