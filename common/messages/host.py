"""Host family: what an agent reports about its hypervisor (agent -> controller, no reply)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from common.messages.base import Int64, Message
from common.messages.descriptor import Family, Timeout, Version, command, report
from common.messages.limits import Count, Text
from common.messages.network import HostNetworkReport
from common.messages.tuning import HostTuningReport
from common.messages.vm import VmStatus
from common.validation import check_host_id

#: Agent -> controller reports and the controller's "report now" command.
HOST = Family("host", Version(1, 2), "agent -> controller reports and heartbeats; report on demand")


class CpuTopology(Message, frozen=True):
    """Host CPUs as libvirt's nodeinfo and capabilities describe them."""

    # Counts are never negative (a negative total would reach the scheduler's inventories).
    cpus: Count
    sockets: Count = 1
    cores: Count = 1
    threads: Count = 1
    numa_cells: Count = 1
    mhz: Count = 0
    model: str = ""


class StoragePoolInfo(Message, frozen=True):
    name: str
    path: str
    capacity_gib: Count
    allocation_gib: Count
    available_gib: Count


class HostReport(Message, frozen=True):
    """``host.report``: full capacity and VM state, on start and every report interval.

    With ``hypervisor_error`` set the agent cannot reach libvirt (libvirtd restarted or stopped):
    the host is *degraded*; the report's facts are the last ones it read and ``vms`` is empty
    (the controller keeps what it has and takes only the error). A full report without it
    follows the reconnect.
    """

    __since__: ClassVar[Mapping[str, Version]] = {"hypervisor_error": Version(1, 2)}

    host_id: str
    hostname: str
    agent_version: str
    hypervisor_type: str  # what libvirt calls it: QEMU, Test, Xen, ...
    hypervisor_version: str
    libvirt_uri: str
    #: /dev/kvm is usable *and* the CPU has vmx/svm: VMs may use domain type kvm.
    hw_virt: bool
    cpu: CpuTopology
    memory_mib: Count
    memory_free_mib: Count
    storage: StoragePoolInfo | None
    networks: tuple[str, ...]
    bridges: tuple[str, ...]
    vms: tuple[VmStatus, ...]
    seq: Int64
    started_at: float
    reported_at: float
    network: HostNetworkReport | None = None
    tuning: HostTuningReport | None = None
    #: why libvirt is unreachable ("libvirt unreachable: ..."); None while the agent reaches it
    hypervisor_error: Text | None = None

    def __post_init__(self) -> None:
        check_host_id(self.host_id)


class Heartbeat(Message, frozen=True):
    """``host.heartbeat``: the agent is alive and consuming; cheap, sent every heartbeat interval."""

    host_id: str
    seq: Int64
    started_at: float
    sent_at: float

    def __post_init__(self) -> None:
        check_host_id(self.host_id)


class VmChanges(Message, frozen=True):
    """``host.vm_changes``: the VMs whose state changed since the last report or delta, O(changed).

    Sent when a command touched a VM and when the hypervisor emits a lifecycle event; the full
    ``host.report`` still comes at start, every report interval and at stop. ``seq`` is drawn from
    the same counter as the full report's, so the controller drops a delta older than the newest
    report or delta it applied (same ``started_at``). Every status was read after ``reported_at``.
    """

    host_id: str
    started_at: float
    seq: Int64
    reported_at: float
    #: changed or new domains, as the hypervisor reports them now
    vms: tuple[VmStatus, ...] = ()
    #: uuids of domains that are no longer defined on the host
    gone: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_host_id(self.host_id)


class ReportRequest(Message, frozen=True):
    """``host.report_now``: ask an agent for an immediate full report (also its liveness probe)."""

    reason: Text = ""


class ReportAck(Message, frozen=True):
    seq: Int64


HOST_REPORT = report(HOST, "host.report", HostReport, "capacity, topology and VM states")
HOST_HEARTBEAT = report(HOST, "host.heartbeat", Heartbeat, "liveness")
HOST_VM_CHANGES = report(
    HOST,
    "host.vm_changes",
    VmChanges,
    "the VMs whose state changed (after a command or a lifecycle event), between full reports",
    since=Version(1, 1),
)
HOST_REPORT_NOW = command(
    HOST,
    "host.report_now",
    ReportRequest,
    ReportAck,
    Timeout.FAST,
    "send a full report now (also a liveness probe)",
    idempotent=True,
)
