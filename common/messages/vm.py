"""VM family: the VM definition and the controller -> agent VM commands.

A :class:`VmSpec` is what the controller decided; the agent resolves pool volumes into
paths (:class:`DiskSpec.path`) and hands the resolved spec to the pure domain-XML builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, ClassVar

from msgspec import Meta

from common.errors import InvalidRequest
from common.messages.base import Message, force_setattr
from common.messages.descriptor import ApiCall, Command, Family, Forward, Role, Timeout, Version, command
from common.messages.limits import (
    MAX_DISKS,
    MAX_NICS,
    MAX_VCPUS,
    CpuSetText,
    DiskGiB,
    Int64,
    MemoryMiB,
    Name,
    Path,
    Text,
    Token,
    Vcpus,
)
from common.validation import check_mac, check_name, check_positive

#: The controller -> agent VM commands (this module and :mod:`common.messages.vmops`).
VM = Family("vm", Version(1, 1), "controller -> agent: a VM's lifecycle, definition, devices and snapshots")


class DomainType(StrEnum):
    """libvirt domain type: ``kvm`` where hardware virtualisation works, ``qemu`` = TCG."""

    KVM = "kvm"
    QEMU = "qemu"
    TEST = "test"


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"
    IDE = "ide"


class DiskDevice(StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


class CacheMode(StrEnum):
    """Disk cache mode; ``none`` is the default (safe with O_DIRECT, no host page cache)."""

    NONE = "none"
    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


class IoMode(StrEnum):
    NATIVE = "native"
    THREADS = "threads"
    IO_URING = "io_uring"


class NicKind(StrEnum):
    NETWORK = "network"  # a libvirt network such as "default"
    BRIDGE = "bridge"  # a host bridge such as "br0"


class NicModel(StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


class PowerState(StrEnum):
    """VM states as virtfleet reports them (libvirt's, by name)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # shutting down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    MISSING = "missing"  # the controller knows it, the host does not have it


#: Power states in which the VM has a running QEMU process (the desired state is then "running").
RUNNING_STATES = frozenset({PowerState.RUNNING, PowerState.BLOCKED, PowerState.PAUSED})


class DesiredPower(StrEnum):
    """Whether the operator wants the VM on or off (what reconciliation aims for)."""

    RUNNING = "running"
    SHUTOFF = "shutoff"

    @classmethod
    def after(cls, state: PowerState) -> DesiredPower:
        """The desired state that matches an observed one (after reboot, suspend, resume...)."""
        return cls.RUNNING if state in RUNNING_STATES else cls.SHUTOFF


class Lifecycle(StrEnum):
    """Where a VM is in its life as the controller tracks it (``status`` in views)."""

    BUILDING = "building"  # claimed on a host, being created there
    ACTIVE = "active"  # exists on its host
    ERROR = "error"  # the last build or import failed (``last_error`` says why)
    DELETING = "deleting"


class Task(StrEnum):
    """The operation in flight on a VM (``task`` in views; None when idle)."""

    BUILDING = "building"
    STARTING = "starting"
    STOPPING = "stopping"
    SHUTTING_DOWN = "shutting-down"
    REBOOTING = "rebooting"
    RESETTING = "resetting"
    SUSPENDING = "suspending"
    RESUMING = "resuming"
    DELETING = "deleting"
    AUTOSTART = "autostart"
    SNAPSHOTTING = "snapshotting"
    REVERTING = "reverting"
    RESIZING = "resizing"
    ATTACHING = "attaching"
    DETACHING = "detaching"
    PINNING = "pinning"


class HostStatus(StrEnum):
    """A host as the controller sees it: up while its heartbeats arrive in time; degraded while
    they arrive but its agent reports that it cannot reach libvirt (nothing is placed there)."""

    UP = "up"
    DOWN = "down"
    DEGRADED = "degraded"


class DiskSpec(Message, frozen=True):
    """One disk or CD-ROM.

    ``source`` is ``new`` (the agent creates ``volume`` in ``pool`` with ``size_gib``) or
    ``existing`` (``path`` names an image already on the host). ``target`` is the guest
    device name (vda, vdb, sda, hdc, ...); the controller assigns it.
    """

    target: Token
    source: Token = "new"
    format: DiskFormat = DiskFormat.QCOW2
    size_gib: DiskGiB = 0
    pool: Name | None = None
    volume: Path | None = None
    path: Path | None = None
    bus: DiskBus = DiskBus.VIRTIO
    device: DiskDevice = DiskDevice.DISK
    cache: CacheMode = CacheMode.NONE
    io: IoMode | None = None
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.source not in {"new", "existing"}:
            raise InvalidRequest(f"disk {self.target}: source must be 'new' or 'existing'")
        if self.source == "new" and self.device is DiskDevice.DISK:
            check_positive(self.size_gib, f"disk {self.target} size (GiB)")
        if self.source == "existing" and not self.path:
            raise InvalidRequest(f"disk {self.target}: an existing image needs a path")
        if self.path is not None and not self.path.startswith("/"):
            raise InvalidRequest(f"disk {self.target}: path must be absolute, got {self.path!r}")


class NicSpec(Message, frozen=True):
    """One network interface: on a libvirt network or a host bridge."""

    kind: NicKind
    source: Name
    model: NicModel = NicModel.VIRTIO
    mac: Token | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise InvalidRequest("a NIC needs a source network or bridge")
        if self.mac is not None:
            # Stored lower-case: libvirt reports MACs lower-case, and they are compared as strings.
            force_setattr(self, "mac", check_mac(self.mac))


class GraphicsSpec(Message, frozen=True):
    """VNC console. ``port`` None means automatic; a fixed port must be 5900-65535."""

    listen: Token = "127.0.0.1"
    port: Int64 | None = None
    password: Token | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 5900 <= self.port <= 65535:
            raise InvalidRequest(f"VNC port must be between 5900 and 65535, got {self.port}")
        if self.password is not None and len(self.password) > 8:
            # QEMU's VNC authentication uses only the first 8 characters; refuse rather than truncate.
            raise InvalidRequest("VNC passwords are limited to 8 characters")


class KernelBoot(Message, frozen=True):
    """Direct kernel boot, an alternative to booting from a disk."""

    kernel: Path
    initrd: Path | None = None
    cmdline: Text = ""


class VcpuPin(Message, frozen=True):
    vcpu: Annotated[int, Meta(ge=0, lt=MAX_VCPUS)]
    cpuset: CpuSetText


class CpuTune(Message, frozen=True):
    """Pinning: each vCPU to a host CPU set, emulator threads to another."""

    vcpu_pins: Annotated[tuple[VcpuPin, ...], Meta(max_length=MAX_VCPUS)] = ()
    emulator_cpuset: CpuSetText | None = None


class VmSpec(Message, frozen=True):
    """A VM as the controller wants it on a host."""

    uuid: Token
    name: Name
    vcpus: Vcpus
    memory_mib: MemoryMiB
    max_vcpus: Vcpus = 0  # 0 = same as vcpus
    max_memory_mib: MemoryMiB = 0  # 0 = same as memory_mib
    domain_type: DomainType = DomainType.KVM
    arch: Token = "x86_64"
    machine: Token | None = None
    cpuset: CpuSetText | None = None  # host CPUs the vCPUs may float over (virt-install --vcpus cpuset=)
    disks: Annotated[tuple[DiskSpec, ...], Meta(max_length=MAX_DISKS)] = ()
    nics: Annotated[tuple[NicSpec, ...], Meta(max_length=MAX_NICS)] = ()
    graphics: GraphicsSpec | None = None
    kernel_boot: KernelBoot | None = None
    autostart: bool = False
    cputune: CpuTune | None = None
    hugepage_size_kib: Int64 | None = None
    serial_log: Path | None = None  # path of a file that receives the serial console
    description: Text = ""

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        check_positive(self.vcpus, "vcpus")
        check_positive(self.memory_mib, "memory (MiB)")
        if self.max_vcpus and self.max_vcpus < self.vcpus:
            raise InvalidRequest(f"max vcpus ({self.max_vcpus}) is below vcpus ({self.vcpus})")
        if self.max_memory_mib and self.max_memory_mib < self.memory_mib:
            raise InvalidRequest(
                f"max memory ({self.max_memory_mib} MiB) is below memory ({self.memory_mib} MiB)"
            )
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise InvalidRequest(f"duplicate disk targets in {targets}")

    @property
    def effective_max_vcpus(self) -> int:
        return self.max_vcpus or self.vcpus

    @property
    def effective_max_memory_mib(self) -> int:
        return self.max_memory_mib or self.memory_mib


# ---------------------------------------------------------------- commands (controller -> agent)


class VmRef(Message, frozen=True):
    """Names a VM on a host; the uuid is authoritative, the name is for messages."""

    uuid: Token
    name: Token

    def __post_init__(self) -> None:
        # libvirt names and uuids never hold NUL; refused here, not as a crash in a path or a
        # PostgreSQL text column (found by the fuzz run).
        if "\x00" in self.uuid or "\x00" in self.name:
            raise InvalidRequest("a VM's uuid and name cannot contain NUL characters")


class CreateVm(Message, frozen=True):
    """``vm.create``: create disks, define the domain, optionally start it. Idempotent by uuid.

    An existing image that another domain on the host uses already is refused (virt-install's
    "in use by other guests") unless ``allow_shared_disk``; CD-ROMs and read-only disks may be shared.
    """

    spec: VmSpec
    start: bool = True
    allow_shared_disk: bool = False


class VmAction(Message, frozen=True):
    """``vm.start|destroy|reboot|suspend|resume``: one lifecycle action on one VM."""

    vm: VmRef


class ShutdownVm(Message, frozen=True):
    """``vm.shutdown``: ACPI shutdown; after ``timeout_s`` optionally power off."""

    vm: VmRef
    timeout_s: float = 60.0
    force_after_timeout: bool = False


class DeleteVm(Message, frozen=True):
    """``vm.delete``: undefine (and power off first); keep the disks unless asked."""

    vm: VmRef
    delete_disks: bool = False


class SetAutostart(Message, frozen=True):
    vm: VmRef
    enabled: bool


class VmStatus(Message, frozen=True):
    """What ``virsh dominfo`` shows, as the agent saw it."""

    uuid: str
    name: str
    state: PowerState
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    cpu_time_ns: int = 0
    autostart: bool = False
    persistent: bool = True
    managed: bool = True  # False for domains virtfleet did not create


class VmResult(Message, frozen=True):
    """Reply to every VM command: the VM's status afterwards (None after a delete).

    ``deleted_volumes``: the volume paths the command deleted (a disk detached with its volume);
    an agent older than vm 1.1 never says, so the controller then keeps the claim (the safe side).
    """

    __since__: ClassVar[Mapping[str, Version]] = {"deleted_volumes": Version(1, 1)}

    status: VmStatus | None = None
    message: str = ""
    disks: tuple[DiskSpec, ...] = ()
    deleted_volumes: tuple[str, ...] = ()


# ---------------------------------------------------------------- what clients see of a VM


class VmView(Message, frozen=True):
    uuid: str
    name: str
    host: str | None
    status: Lifecycle
    power_state: PowerState  # as the host last reported it
    desired_power: DesiredPower
    task: Task | None  # the operation in flight
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


class VmRefRequest(Message, frozen=True):
    name: Name

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")


class VmActionDone(Message, frozen=True):
    vm: VmView | None
    message: str = ""


# ---------------------------------------------------------------- the commands of this module

_F, _N, _S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW

VM_CREATE = command(
    VM, "vm.create", CreateVm, VmResult, _N, "create disks, define the domain, start it", idempotent=True
)
VM_START = command(VM, "vm.start", VmAction, VmResult, _N, "virsh start", idempotent=True)
VM_SHUTDOWN = command(
    VM, "vm.shutdown", ShutdownVm, VmResult, _S, "virsh shutdown (ACPI), optional forced off", idempotent=True
)
VM_DESTROY = command(VM, "vm.destroy", VmAction, VmResult, _N, "virsh destroy (power off)", idempotent=True)
VM_REBOOT = command(VM, "vm.reboot", VmAction, VmResult, _N, "virsh reboot")
VM_RESET = command(
    VM,
    "vm.reset",
    VmAction,
    VmResult,
    _F,
    "virsh reset (hard reset, like the reset button)",
    since=Version(1, 1),
)
VM_SUSPEND = command(VM, "vm.suspend", VmAction, VmResult, _F, "virsh suspend", idempotent=True)
VM_RESUME = command(VM, "vm.resume", VmAction, VmResult, _F, "virsh resume", idempotent=True)
VM_DELETE = command(
    VM, "vm.delete", DeleteVm, VmResult, _N, "virsh destroy + undefine (+ delete disks)", idempotent=True
)
VM_AUTOSTART = command(
    VM, "vm.autostart", SetAutostart, VmResult, _F, "virsh autostart [--disable]", idempotent=True
)


# ------------------------------------------------------------------ simple VM operations


@dataclass(frozen=True, slots=True)
class VmForward(Forward):
    """A simple VM operation: the controller finds the VM, checks that its host is up, marks
    ``task``, sends ``command`` with the VM's reference and records the VM's state afterwards.

    ``desired``: the desired power state afterwards; None follows the observed state
    (:meth:`DesiredPower.after`). The CLI offers each one as ``virtfleet vm <verb> NAME``, the
    verb being the last part of the command's kind.
    """

    command: Command[VmAction, VmResult]
    task: Task
    desired: DesiredPower | None = None

    @property
    def verb(self) -> str:
        """The CLI verb: ``vm.reboot`` -> ``reboot``."""
        return self.command.kind.rpartition(".")[2]


def vm_action(
    command: Command[VmAction, VmResult],
    task: Task,
    doc: str,
    *,
    desired: DesiredPower | None = None,
    role: Role = Role.OPERATOR,
) -> ApiCall[VmRefRequest, VmActionDone]:
    """Declare the API call ``api.<kind>`` of a simple VM operation (see :class:`VmForward`); it
    belongs to the command's family and is as old as the command."""
    return ApiCall(
        f"api.{command.kind}",
        VmRefRequest,
        VmActionDone,
        command.family,
        command.timeout,
        doc,
        role,
        command.idempotent,
        command.since,
        forward=VmForward(command, task, desired),
    )


# ---------------------------------------------------------------- simple VM operations (command + API call)

API_VM_START = vm_action(VM_START, Task.STARTING, "Start (power on) a VM.", desired=DesiredPower.RUNNING)
API_VM_DESTROY = vm_action(
    VM_DESTROY,
    Task.STOPPING,
    "Power a VM off at once (virsh destroy); the definition stays.",
    desired=DesiredPower.SHUTOFF,
)
API_VM_REBOOT = vm_action(VM_REBOOT, Task.REBOOTING, "Reboot a running VM (virsh reboot).")
API_VM_RESET = vm_action(VM_RESET, Task.RESETTING, "Reset a VM at once, like its reset button (virsh reset).")
API_VM_SUSPEND = vm_action(VM_SUSPEND, Task.SUSPENDING, "Pause a running VM (virsh suspend).")
API_VM_RESUME = vm_action(VM_RESUME, Task.RESUMING, "Resume a paused VM (virsh resume).")
