"""API family: what the CLI (or any client) asks the controller, and the answers.

Field names here are the stable JSON field names of ``virtfleet --output json``
(docs/cli.md): rename nothing without a version bump.
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

from common.cpuset import MAX_CPU_ID, CpuSetSyntaxError, parse_cpuset
from common.errors import InvalidRequest
from common.messages.base import Message, force_setattr
from common.messages.descriptor import (
    Family,
    Role,
    Timeout,
    Version,
    api_call,
    query,
)
from common.messages.limits import (
    MAX_DISKS,
    MAX_NICS,
    CpuSetText,
    DiskGiB,
    Key,
    MemoryMiB,
    Name,
    Path,
    Seconds,
    Token,
    Vcpus,
)
from common.messages.vm import (
    DiskDevice,
    DiskSpec,
    GraphicsSpec,
    HostStatus,
    KernelBoot,
    NicKind,
    NicSpec,
    VmActionDone,
    VmRefRequest,
    VmView,
)
from common.validation import check_host_id, check_name, check_positive

#: Every client -> controller call (this module and the feature modules' API calls).
API = Family("api", Version(1, 1), "client (virtfleet CLI) -> controller")

_TARGET_RE = re.compile(r"(vd|sd|hd|xvd)[a-z]{1,2}")
_MACHINE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# ------------------------------------------------------------------ views (answers)


class ResourceView(Message, frozen=True):
    """One resource of one host, Nova-placement style."""

    resource: str
    total: int
    reserved: int
    allocation_ratio: float
    capacity: int
    used: int
    free: int


class HostView(Message, frozen=True):
    host_id: str
    hostname: str
    status: HostStatus
    enabled: bool
    maintenance: bool
    hypervisor_type: str
    hw_virt: bool
    cpus: int
    memory_mib: int
    disk_gib: int
    vm_count: int
    last_heartbeat: float | None
    down_since: float | None
    libvirt_uri: str = ""
    resources: tuple[ResourceView, ...] = ()
    networks: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()
    #: why it is disabled, in maintenance or degraded (its agent cannot reach libvirt); None when
    #: none applies or no reason was given
    state_reason: str | None = None


class RejectionView(Message, frozen=True):
    """Why one host was not chosen."""

    host: str
    rule: str
    message: str


class CandidateView(Message, frozen=True):
    host: str
    score: float
    weights: dict[str, float]


class PlacementView(Message, frozen=True):
    host: str | None
    alternates: tuple[str, ...]
    candidates: tuple[CandidateView, ...]
    rejected: tuple[RejectionView, ...]


# ------------------------------------------------------------------ requests


class Empty(Message, frozen=True):
    pass


class HostRef(Message, frozen=True):
    host: Name

    def __post_init__(self) -> None:
        # Checked before any lookup: PostgreSQL refuses NUL in text (a crash found by the fuzz run).
        check_host_id(self.host)


class HostList(Message, frozen=True):
    hosts: tuple[HostView, ...]


class VmCreate(Message, frozen=True):
    """``api.vm.create``: the virt-install equivalent, placed by the scheduler unless ``host`` is given.

    Disks: either the legacy shorthand ``disk_gib`` (one new qcow2 root disk ``vda`` of that size,
    ``disks`` empty), or ``disks`` listing every disk (new volumes of ``size_gib`` in the host's pool, or
    ``source='existing'`` images), with ``disk_gib`` 0 or equal to the total of the new disks: it is then
    set to that total. Either way ``disk_gib`` is what the VM claims of the host's pool (existing images
    claim nothing). Empty ``target`` names are assigned by the controller (vda, vdb, ..., hda, ...).
    NICs without a MAC get a generated 52:54:00:xx:xx:xx. ``server_group``, ``cpu_policy`` and
    ``hugepage_size`` are placement and tuning requests.
    """

    name: Name
    vcpus: Vcpus
    memory_mib: MemoryMiB
    disk_gib: DiskGiB = 0
    host: Name | None = None
    wait: bool = True
    dry_run: bool = False
    start: bool = True
    idempotency_key: Key | None = None
    domain_type: Token | None = None  # None: kvm where the host has hardware virt, else qemu
    max_vcpus: Vcpus = 0  # 0: same as vcpus; more leaves room to hot-add vCPUs
    max_memory_mib: MemoryMiB = 0  # 0: same as memory_mib; more leaves room to balloon up
    cpuset: CpuSetText | None = None  # host CPUs the vCPUs may run on (virt-install --vcpus cpuset=)
    disks: Annotated[tuple[DiskSpec, ...], Meta(max_length=MAX_DISKS)] = ()
    cdrom: Path | None = None  # an ISO image on the host, attached as a CD-ROM (booted first)
    nics: Annotated[tuple[NicSpec, ...], Meta(max_length=MAX_NICS)] = ()
    graphics: GraphicsSpec | None = None
    kernel_boot: KernelBoot | None = None
    autostart: bool = False
    allow_shared_disk: bool = False  # virt-install --check path_in_use=off
    machine: Token | None = None
    serial_log: Path | None = None  # a file on the host that receives the serial console
    server_group: Name | None = None
    cpu_policy: Token = "shared"  # shared | dedicated
    hugepage_size: Token | None = None  # None | 2M | 1G

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if self.host is not None:
            check_name(self.host, "host")
        if self.domain_type not in (None, "kvm", "qemu", "test"):
            raise InvalidRequest(f"domain type must be kvm, qemu or test, got {self.domain_type!r}")
        self._check_sizes()
        self._check_disks()
        self._check_boot()
        for nic_mac in (n.mac for n in self.nics if n.mac is not None):
            if sum(1 for n in self.nics if n.mac == nic_mac) > 1:
                raise InvalidRequest(f"MAC address {nic_mac} is given to two NICs")
        if self.server_group is not None:
            check_name(self.server_group, "server group")
        if self.cpu_policy not in ("shared", "dedicated"):
            raise InvalidRequest(f"cpu policy must be shared or dedicated, got {self.cpu_policy!r}")
        if self.hugepage_size not in (None, "2M", "1G"):
            raise InvalidRequest(f"hugepage size must be 2M or 1G, got {self.hugepage_size!r}")

    def _check_sizes(self) -> None:
        check_positive(self.vcpus, "vcpus")
        check_positive(self.memory_mib, "memory (MiB)")
        if isinstance(self.disk_gib, bool) or self.disk_gib < 0:
            raise InvalidRequest(f"disk (GiB) must be 0 or more, got {self.disk_gib!r}")
        if self.max_vcpus < 0 or self.max_memory_mib < 0:
            raise InvalidRequest("max vcpus and max memory must be 0 (same as current) or more")
        if self.max_vcpus and self.max_vcpus < self.vcpus:
            raise InvalidRequest(f"max vcpus ({self.max_vcpus}) is below vcpus ({self.vcpus})")
        if self.max_memory_mib and self.max_memory_mib < self.memory_mib:
            raise InvalidRequest(
                f"max memory ({self.max_memory_mib} MiB) is below memory ({self.memory_mib} MiB)"
            )
        if self.cpuset is not None:
            try:
                # Bounded (common.cpuset.MAX_CPU_ID): `0-99999999999` is refused here, not by libvirt.
                parse_cpuset(self.cpuset)
            except CpuSetSyntaxError as exc:
                raise InvalidRequest(
                    f"invalid {exc}; use libvirt's syntax, e.g. 1-4,6,8 or 0-7,^3",
                    details={"field": "cpuset", "max_cpu": MAX_CPU_ID},
                ) from None

    def _check_boot(self) -> None:
        paths = [(self.cdrom, "CD-ROM image"), (self.serial_log, "serial log")]
        if self.kernel_boot is not None:
            paths += [(self.kernel_boot.kernel, "kernel"), (self.kernel_boot.initrd, "initrd")]
        for path, what in paths:
            if path is not None and not path.startswith("/"):
                raise InvalidRequest(f"{what} must be an absolute path on the host, got {path!r}")
        if not self.disks and not self.disk_gib and self.cdrom is None and self.kernel_boot is None:
            raise InvalidRequest("the VM has nothing to boot from: give a disk, a CD-ROM or a kernel")
        if self.machine is not None and not _MACHINE_RE.fullmatch(self.machine):
            raise InvalidRequest(f"invalid machine type {self.machine!r}")

    def _check_disks(self) -> None:
        if not self.disks:
            return
        new_total = sum(d.size_gib for d in self.disks if d.source == "new" and d.device is DiskDevice.DISK)
        if self.disk_gib == 0:
            force_setattr(self, "disk_gib", new_total)
        elif self.disk_gib != new_total:
            raise InvalidRequest(
                f"disk_gib ({self.disk_gib}) must be 0 or the total of the new disks ({new_total} GiB) "
                "when the disks are listed"
            )
        targets = [d.target for d in self.disks if d.target]
        for target in targets:
            if not _TARGET_RE.fullmatch(target):
                raise InvalidRequest(f"invalid disk target {target!r}: expected a name like vdb, sdb or hdc")
        if len(set(targets)) != len(targets):
            raise InvalidRequest(f"duplicate disk targets in {targets}")
        for disk in self.disks:
            if disk.device is DiskDevice.CDROM and disk.source != "existing":
                raise InvalidRequest("a CD-ROM must be an existing image (an ISO on the host)")

    @property
    def new_disk_gib(self) -> int:
        """GiB of new volumes in the host's pool: what placement claims (existing images claim nothing)."""
        return self.disk_gib

    @property
    def nic_networks(self) -> frozenset[str]:
        """libvirt networks the host must have for this VM's NICs (for placement)."""
        return frozenset(n.source for n in self.nics if n.kind is NicKind.NETWORK)

    @property
    def nic_bridges(self) -> frozenset[str]:
        """Host bridges the host must have for this VM's NICs (for placement)."""
        return frozenset(n.source for n in self.nics if n.kind is NicKind.BRIDGE)


class VmCreated(Message, frozen=True):
    vm: VmView | None
    placement: PlacementView
    dry_run: bool = False


class VmListRequest(Message, frozen=True):
    all: bool = True
    host: Name | None = None

    def __post_init__(self) -> None:
        if self.host is not None:
            check_host_id(self.host)


class VmList(Message, frozen=True):
    vms: tuple[VmView, ...]


class VmShutdownRequest(Message, frozen=True):
    name: Name
    timeout_s: Seconds = 60.0
    force: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if self.timeout_s <= 0:
            raise InvalidRequest("shutdown timeout must be positive")


class VmDeleteRequest(Message, frozen=True):
    name: Name
    delete_disks: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


# ------------------------------------------------------------------ the calls of this module

_F, _N, _S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW
_READ, _OPERATE = Role.READER, Role.OPERATOR

API_PING = query(API, "api.ping", Empty, Empty, "is a controller there")
API_HOST_LIST = query(API, "api.host.list", Empty, HostList, "virtfleet host list")
API_HOST_SHOW = query(API, "api.host.show", HostRef, HostView, "virtfleet host show")
API_VM_CREATE = api_call(API, "api.vm.create", VmCreate, VmCreated, _S, "virtfleet vm create", role=_OPERATE)
API_VM_LIST = query(API, "api.vm.list", VmListRequest, VmList, "virtfleet vm list")
API_VM_SHOW = query(API, "api.vm.show", VmRefRequest, VmView, "virtfleet vm show")
API_VM_SHUTDOWN = api_call(
    API,
    "api.vm.shutdown",
    VmShutdownRequest,
    VmActionDone,
    _S,
    "virtfleet vm shutdown",
    role=_OPERATE,
    idempotent=True,
)
API_VM_DELETE = api_call(
    API,
    "api.vm.delete",
    VmDeleteRequest,
    VmActionDone,
    _N,
    "virtfleet vm delete",
    role=_OPERATE,
    idempotent=True,
)
