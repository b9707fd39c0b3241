"""Performance tuning: CPU sets and pinning, hugepages, THP, IO schedulers.

What an agent adds to its host report (:class:`HostTuningReport`), the controller -> agent
tuning commands and the client -> controller tuning requests. CPU sets travel as libvirt
cpuset strings (``"0-3,8"``); an empty string is the empty set. Page sizes travel in KiB
(2048 = 2 MiB pages, 1048576 = 1 GiB pages); people write them ``2M`` and ``1G``.
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

from common.errors import InvalidRequest
from common.messages.api import API, HostRef
from common.messages.base import Message
from common.messages.descriptor import Family, Role, Timeout, Version, api_call, command, query
from common.messages.limits import MAX_ITEMS, MAX_VCPUS, Count, CpuSetText, Name, Pid, Token, Vcpus
from common.messages.vm import VcpuPin, VmRef, VmRefRequest
from common.validation import check_host_id, check_name

#: Page sizes virtfleet schedules, by the name people use.
PAGE_SIZES_KIB: dict[str, int] = {"2M": 2048, "1G": 1048576}

_SIZE_RE = re.compile(r"([0-9]+)\s*([KMG]?)(?:I?B)?", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "K": 1, "M": 1024, "G": 1024 * 1024}
_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}")
_SCHEDULER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

#: The host tune profiles the agent knows (see agent/tuning/profile.py for what each sets).
PROFILES: tuple[str, ...] = ("virt-host",)


def page_size_kib(text: str) -> int:
    """``"2M"`` -> 2048, ``"1G"`` -> 1048576 (also ``2048k``, ``2MiB``, ``2048``); only 2M and 1G."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest(f"invalid page size {text!r}: use 2M or 1G")
    kib = int(match.group(1)) * _SIZE_FACTOR[match.group(2).upper()]
    if kib not in PAGE_SIZES_KIB.values():
        raise InvalidRequest(f"unsupported page size {text!r}: use 2M or 1G")
    return kib


def page_size_label(kib: int) -> str:
    """2048 -> ``"2M"``, 1048576 -> ``"1G"``, anything else ``"<n>K"``."""
    for label, size in PAGE_SIZES_KIB.items():
        if size == kib:
            return label
    return f"{kib}K"


def _check_device(device: str) -> str:
    if not _DEVICE_RE.fullmatch(device):
        raise InvalidRequest(f"invalid block device name {device!r} (e.g. vda, sda, nvme0n1)")
    return device


def _check_scheduler(name: str) -> str:
    if not _SCHEDULER_RE.fullmatch(name):
        raise InvalidRequest(f"invalid IO scheduler name {name!r} (e.g. none, mq-deadline, kyber, bfq)")
    return name


def _check_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise InvalidRequest(f"invalid process id {pid!r}")
    return pid


def _check_cpus(cpus: str, what: str) -> str:
    # The full cpuset grammar is checked where it is used (controller and agent); here only
    # what can never be right.
    if not cpus.strip() or not re.fullmatch(r"[0-9,\-^\s]+", cpus):
        raise InvalidRequest(f"invalid {what} {cpus!r}: use a CPU list such as 2, 0-3 or 0-3,^2,8")
    return cpus


# ------------------------------------------------------------------------ host report


class NumaCell(Message, frozen=True):
    """One NUMA node: its CPUs (cpuset string) and memory."""

    id: int
    cpus: str
    memory_mib: int = 0


class HugepagePool(Message, frozen=True):
    """The kernel's pool of one page size (``/sys/kernel/mm/hugepages/hugepages-<size>kB``).

    ``free`` counts pages not yet faulted in, including ``reserved`` ones that mappings were
    promised (HugePages_Rsvd); ``mounted`` says a hugetlbfs of this size is mounted, which
    libvirt needs to back guests with these pages.
    """

    size_kib: int
    total: int
    free: int
    reserved: int = 0
    surplus: int = 0
    mounted: bool = False

    @property
    def available(self) -> int:
        """Pages a new guest could still get."""
        return max(0, self.free - self.reserved)


class BlockDevice(Message, frozen=True):
    """A block device with its IO scheduler (``/sys/block/<name>/queue/scheduler``)."""

    name: str
    scheduler: str
    available: tuple[str, ...] = ()
    rotational: bool = False
    #: backed by a device (disk, NVMe, virtio) rather than loop, ram, zram, dm
    physical: bool = True


class HostTuningReport(Message, frozen=True):
    """Tuning facts an agent adds to its host report (CPU sets, topology, hugepages, IO).

    CPU sets are the agent's configuration resolved against the online CPUs: ``dedicated``
    CPUs are handed one per vCPU to VMs with the dedicated CPU policy, ``shared`` CPUs run
    shared VMs and every VM's emulator threads, ``reserved`` CPUs are left to the host.
    """

    sockets: int = 1
    cores_per_socket: int = 1
    threads_per_core: int = 1
    cells: tuple[NumaCell, ...] = ()
    online_cpus: str = ""
    dedicated_cpus: str = ""
    shared_cpus: str = ""
    reserved_cpus: str = ""
    hugepages: tuple[HugepagePool, ...] = ()
    default_hugepage_kib: int = 0
    thp_enabled: str = ""
    thp_defrag: str = ""
    block_devices: tuple[BlockDevice, ...] = ()
    #: the facts come from a simulated host (libvirt's test driver), not this machine's kernel
    simulated: bool = False


# ------------------------------------------------------------------------ agent commands


class ThreadAffinity(Message, frozen=True):
    """One thread of a QEMU process and the CPUs it may run on (what ``taskset -p`` shows)."""

    tid: int
    name: str
    cpus: str
    vcpu: int | None = None  # the vCPU this thread runs (from its name "CPU <n>/KVM|TCG"), else None


class VmAffinity(Message, frozen=True):
    """A VM's pinning as libvirt has it and, where a QEMU process runs, as the host shows it."""

    uuid: str
    name: str
    state: str
    vcpu_pins: tuple[VcpuPin, ...] = ()
    emulator_cpuset: str | None = None
    pid: int | None = None
    threads: tuple[ThreadAffinity, ...] = ()
    #: True when ``threads`` were read from /proc (a real QEMU process); False on a simulated host
    observed: bool = False


class PinVm(Message, frozen=True):
    """``tuning.pin``: re-pin vCPUs and/or the emulator threads of a VM (live, and persistently)."""

    vm: VmRef
    vcpu_pins: Annotated[tuple[VcpuPin, ...], Meta(max_length=MAX_VCPUS)] = ()
    emulator_cpuset: CpuSetText | None = None


class GetAffinity(Message, frozen=True):
    """``tuning.affinity``: a VM's pinning and its threads' affinity."""

    vm: VmRef


class ProcessQuery(Message, frozen=True):
    """``tuning.process``: what a host process is (is it the QEMU of a VM virtfleet manages?)."""

    pid: Pid


class ProcessInfo(Message, frozen=True):
    pid: int
    qemu: bool
    vm_uuid: str | None = None
    vm_name: str | None = None
    managed: bool = False
    threads: tuple[ThreadAffinity, ...] = ()


class SetTaskset(Message, frozen=True):
    """``tuning.taskset``: ``taskset -a -pc CPUS PID`` on the QEMU process of VM ``vm_uuid``."""

    pid: Pid
    vm_uuid: Token
    cpuset: CpuSetText


class TasksetResult(Message, frozen=True):
    pid: int
    vm_uuid: str
    before: tuple[ThreadAffinity, ...]
    after: tuple[ThreadAffinity, ...]


class SetHugepages(Message, frozen=True):
    """``tuning.hugepages``: set the kernel's pool of ``size_kib`` pages to ``count`` pages."""

    size_kib: Count
    count: Count


class HugepagesResult(Message, frozen=True):
    """The kernel may allocate fewer pages than asked (fragmented memory): ``pool.total`` is the truth."""

    size_kib: int
    requested: int
    before: int
    pool: HugepagePool
    message: str = ""


class SetIoScheduler(Message, frozen=True):
    """``tuning.io_scheduler``: ``echo SCHED > /sys/block/DEVICE/queue/scheduler``."""

    device: Token
    scheduler: Token

    def __post_init__(self) -> None:
        # Checked here too, not only in the API's request: the device becomes a /sys path.
        _check_device(self.device)
        _check_scheduler(self.scheduler)


class IoSchedulerResult(Message, frozen=True):
    device: str
    before: str
    after: str
    available: tuple[str, ...] = ()


class HugepageTarget(Message, frozen=True):
    size_kib: Count
    count: Count


class ApplyProfile(Message, frozen=True):
    """``tuning.profile``: apply a documented host profile; idempotent. ``hugepages`` are the
    pool sizes to grow to (a profile never shrinks a pool)."""

    profile: Token
    hugepages: Annotated[tuple[HugepageTarget, ...], Meta(max_length=MAX_ITEMS)] = ()
    dry_run: bool = False


class SettingChange(Message, frozen=True):
    """One setting a profile looked at: ``setting`` is a path-like name such as ``thp.enabled``."""

    setting: str
    before: str
    after: str
    changed: bool
    note: str = ""


class ProfileResult(Message, frozen=True):
    profile: str
    changes: tuple[SettingChange, ...]
    dry_run: bool = False

    @property
    def changed(self) -> tuple[SettingChange, ...]:
        return tuple(c for c in self.changes if c.changed)


# ------------------------------------------------------------------------ API (client -> controller)


class PinnedVm(Message, frozen=True):
    name: str
    cpu_policy: str
    pcpus: str
    status: str


class HostTuningView(Message, frozen=True):
    """``virtfleet host tuning HOST``: the host's last tuning facts plus what VMs hold of them."""

    host: str
    reported_at: float | None
    facts: HostTuningReport | None
    free_pcpus: str = ""
    pinned: tuple[PinnedVm, ...] = ()
    #: hugepages claimed by VMs on the host, by page size label ("2M": pages)
    hugepages_claimed: dict[str, int] | None = None


class VmPinRequest(Message, frozen=True):
    """``virtfleet vm pin NAME --vcpu N --cpus LIST`` (or ``--emulator``)."""

    name: Name
    cpus: CpuSetText
    vcpu: Vcpus | None = None
    emulator: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        _check_cpus(self.cpus, "CPU list")
        if self.emulator == (self.vcpu is not None):
            raise InvalidRequest("pin either one vCPU (--vcpu N) or the emulator threads (--emulator)")
        if self.vcpu is not None and (isinstance(self.vcpu, bool) or self.vcpu < 0):
            raise InvalidRequest(f"vCPU number must be 0 or more, got {self.vcpu!r}")


class VmAffinityView(Message, frozen=True):
    """A VM's CPU policy, what it may be pinned to, and its actual affinity."""

    vm: str
    host: str
    cpu_policy: str
    pcpus: str
    allowance: str
    affinity: VmAffinity
    message: str = ""


class HostTasksetRequest(Message, frozen=True):
    host: Name
    pid: Pid
    cpus: CpuSetText

    def __post_init__(self) -> None:
        check_host_id(self.host)
        _check_pid(self.pid)
        _check_cpus(self.cpus, "CPU list")


class HostTasksetDone(Message, frozen=True):
    host: str
    vm: str
    result: TasksetResult


class HostHugepagesRequest(Message, frozen=True):
    host: Name
    size: Token
    count: Count

    def __post_init__(self) -> None:
        check_host_id(self.host)
        page_size_kib(self.size)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise InvalidRequest(f"page count must be 0 or more, got {self.count!r}")


class HostHugepagesDone(Message, frozen=True):
    host: str
    result: HugepagesResult


class HostIoSchedulerRequest(Message, frozen=True):
    host: Name
    device: Token
    scheduler: Token

    def __post_init__(self) -> None:
        check_host_id(self.host)
        _check_device(self.device)
        _check_scheduler(self.scheduler)


class HostIoSchedulerDone(Message, frozen=True):
    host: str
    result: IoSchedulerResult


class HostTuneRequest(Message, frozen=True):
    """``virtfleet host tune HOST --profile virt-host [--hugepages 2M=64]``."""

    host: Name
    profile: Token
    hugepages: Annotated[dict[Token, Count], Meta(max_length=MAX_ITEMS)] | None = (
        None  # page size label -> pool size to grow to
    )
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_host_id(self.host)
        if self.profile not in PROFILES:
            raise InvalidRequest(f"unknown profile {self.profile!r}; known: {', '.join(PROFILES)}")
        for size, count in (self.hugepages or {}).items():
            page_size_kib(size)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidRequest(f"hugepage count for {size} must be 0 or more, got {count!r}")


class HostTuneDone(Message, frozen=True):
    host: str
    result: ProfileResult


_F, _N = Timeout.FAST, Timeout.NORMAL
_READ, _OPERATE, _ADMIN = Role.READER, Role.OPERATOR, Role.ADMIN

#: Performance tuning of a host and its VMs (controller -> agent).
TUNING = Family("tuning", Version(1, 0), "controller -> agent: CPU pinning, taskset, hugepages, IO, profiles")

# -- controller -> agent
TUNING_PIN = command(
    TUNING,
    "tuning.pin",
    PinVm,
    VmAffinity,
    _F,
    "virsh vcpupin / emulatorpin --live --config",
    idempotent=True,
)
TUNING_AFFINITY = command(
    TUNING,
    "tuning.affinity",
    GetAffinity,
    VmAffinity,
    _F,
    "virsh vcpupin + taskset -p of every QEMU thread",
    idempotent=True,
)
TUNING_PROCESS = command(
    TUNING,
    "tuning.process",
    ProcessQuery,
    ProcessInfo,
    _F,
    "which VM a host process belongs to",
    idempotent=True,
)
TUNING_TASKSET = command(
    TUNING,
    "tuning.taskset",
    SetTaskset,
    TasksetResult,
    _F,
    "taskset -a -pc on a VM's QEMU process",
    idempotent=True,
)
TUNING_HUGEPAGES = command(
    TUNING,
    "tuning.hugepages",
    SetHugepages,
    HugepagesResult,
    _N,
    "set the hugepage pool of one size",
    idempotent=True,
)
TUNING_IO_SCHEDULER = command(
    TUNING,
    "tuning.io_scheduler",
    SetIoScheduler,
    IoSchedulerResult,
    _F,
    "set a block device's IO scheduler",
    idempotent=True,
)
TUNING_PROFILE = command(
    TUNING,
    "tuning.profile",
    ApplyProfile,
    ProfileResult,
    _N,
    "apply a host tune profile (virt-host)",
    idempotent=True,
)

# -- client -> controller
API_TUNING_SHOW = query(API, "api.tuning.show", HostRef, HostTuningView, "virtfleet host tuning")
API_TUNING_PIN = api_call(
    API, "api.tuning.pin", VmPinRequest, VmAffinityView, _F, "virtfleet vm pin", role=_ADMIN, idempotent=True
)
API_TUNING_AFFINITY = query(API, "api.tuning.affinity", VmRefRequest, VmAffinityView, "virtfleet vm affinity")
API_TUNING_TASKSET = api_call(
    API,
    "api.tuning.taskset",
    HostTasksetRequest,
    HostTasksetDone,
    _F,
    "virtfleet host taskset",
    role=_ADMIN,
    idempotent=True,
)
API_TUNING_HUGEPAGES = api_call(
    API,
    "api.tuning.hugepages",
    HostHugepagesRequest,
    HostHugepagesDone,
    _N,
    "virtfleet host hugepages",
    role=_ADMIN,
    idempotent=True,
)
API_TUNING_IO_SCHEDULER = api_call(
    API,
    "api.tuning.io_scheduler",
    HostIoSchedulerRequest,
    HostIoSchedulerDone,
    _F,
    "virtfleet host io-scheduler",
    role=_ADMIN,
    idempotent=True,
)
API_TUNING_TUNE = api_call(
    API,
    "api.tuning.tune",
    HostTuneRequest,
    HostTuneDone,
    _N,
    "virtfleet host tune --profile",
    role=_ADMIN,
    idempotent=True,
)
