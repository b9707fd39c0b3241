"""API family: what the CLI (or any client) asks the controller, and the answers.

Field names here are the stable JSON field names of ``virtfleet --output json``
(docs/cli.md): rename nothing without a version bump.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidRequest
from common.validation import check_name, check_positive

FAMILY_VERSION = "1.0"


# ------------------------------------------------------------------ views (answers)


@dataclass(frozen=True, slots=True)
class ResourceView:
    """One resource of one host, Nova-placement style."""

    resource: str
    total: int
    reserved: int
    allocation_ratio: float
    capacity: int
    used: int
    free: int


@dataclass(frozen=True, slots=True)
class HostView:
    host_id: str
    hostname: str
    status: str  # up | down
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


@dataclass(frozen=True, slots=True)
class VmView:
    uuid: str
    name: str
    host: str | None
    status: str  # building | active | error | deleting | deleted
    power_state: str  # as the host last reported it (PowerState values)
    desired_power: str  # running | shutoff
    task: str | None  # operation in flight
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    disk_gib: int
    autostart: bool
    persistent: bool
    cpu_time_ns: int
    created_at: float
    updated_at: float
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class RejectionView:
    """Why one host was not chosen."""

    host: str
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class CandidateView:
    host: str
    score: float
    weights: dict[str, float]


@dataclass(frozen=True, slots=True)
class PlacementView:
    host: str | None
    alternates: tuple[str, ...]
    candidates: tuple[CandidateView, ...]
    rejected: tuple[RejectionView, ...]


# ------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class Empty:
    pass


@dataclass(frozen=True, slots=True)
class HostRef:
    host: str


@dataclass(frozen=True, slots=True)
class HostList:
    hosts: tuple[HostView, ...]


@dataclass(frozen=True, slots=True)
class VmCreate:
    """``api.vm.create``: the virt-install equivalent, placed by the scheduler unless ``host`` is given."""

    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    host: str | None = None
    wait: bool = True
    dry_run: bool = False
    start: bool = True
    idempotency_key: str | None = None
    domain_type: str | None = None  # None: kvm where the host has hardware virt, else qemu

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.vcpus, "vcpus")
        check_positive(self.memory_mib, "memory (MiB)")
        check_positive(self.disk_gib, "disk (GiB)")
        if self.host is not None:
            check_name(self.host, "host")
        if self.domain_type not in (None, "kvm", "qemu", "test"):
            raise InvalidRequest(f"domain type must be kvm, qemu or test, got {self.domain_type!r}")


@dataclass(frozen=True, slots=True)
class VmCreated:
    vm: VmView | None
    placement: PlacementView
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class VmRefRequest:
    name: str

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


@dataclass(frozen=True, slots=True)
class VmListRequest:
    all: bool = True
    host: str | None = None


@dataclass(frozen=True, slots=True)
class VmList:
    vms: tuple[VmView, ...]


@dataclass(frozen=True, slots=True)
class VmShutdownRequest:
    name: str
    timeout_s: float = 60.0
    force: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        if self.timeout_s <= 0:
            raise InvalidRequest("shutdown timeout must be positive")


@dataclass(frozen=True, slots=True)
class VmDeleteRequest:
    name: str
    delete_disks: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


@dataclass(frozen=True, slots=True)
class VmActionDone:
    vm: VmView | None
    message: str = ""
