"""Pure translation between stored records and the scheduler's model and the API's views.

Decides, given ``now`` and the configuration, whether a host is up, what each of its
inventories is (reported totals, operator overrides, fleet defaults) and what a request
for a VM asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from common.messages.api import HostView, RejectionView, ResourceView, VmView
from controller.config import ControllerConfig
from controller.db.repository import HostRecord, VmRecord
from controller.scheduler.model import (
    FleetSnapshot,
    HostRejection,
    HostState,
    Inventory,
    PlacementPolicy,
    PlacementRequest,
    ResourceClass,
    Strategy,
)

#: Hypervisors that cannot overcommit memory (the ops notes: Xen cannot, KVM can).
NO_MEMORY_OVERCOMMIT = frozenset({"xen"})


def host_is_up(record: HostRecord, now: float, down_after_s: float) -> bool:
    """Up when the last heartbeat is recent enough."""
    return record.last_heartbeat is not None and now - record.last_heartbeat <= down_after_s


def down_since(record: HostRecord, now: float, down_after_s: float) -> float | None:
    """When a down host was last heard of (None if up or never heard of)."""
    if host_is_up(record, now, down_after_s):
        return None
    return record.last_heartbeat


def inventories(record: HostRecord, config: ControllerConfig) -> dict[ResourceClass, Inventory]:
    """vCPU, memory and disk inventories: reported totals, reserved amounts and ratios."""
    oc = config.overcommit
    ram_ratio = record.ram_ratio if record.ram_ratio is not None else oc.ram_ratio
    if record.hypervisor_type.lower() in NO_MEMORY_OVERCOMMIT:
        ram_ratio = 1.0
    return {
        ResourceClass.VCPU: Inventory.for_class(
            ResourceClass.VCPU,
            record.cpus,
            reserved=min(
                record.cpus, record.reserved_cpus if record.reserved_cpus is not None else oc.reserved_cpus
            ),
            allocation_ratio=record.cpu_ratio if record.cpu_ratio is not None else oc.cpu_ratio,
        ),
        ResourceClass.MEMORY_MIB: Inventory.for_class(
            ResourceClass.MEMORY_MIB,
            record.memory_mib,
            reserved=min(
                record.memory_mib,
                record.reserved_memory_mib
                if record.reserved_memory_mib is not None
                else oc.reserved_memory_mib,
            ),
            allocation_ratio=ram_ratio,
        ),
        ResourceClass.DISK_GIB: Inventory.for_class(
            ResourceClass.DISK_GIB,
            record.disk_gib,
            reserved=min(
                record.disk_gib,
                record.reserved_disk_gib if record.reserved_disk_gib is not None else oc.reserved_disk_gib,
            ),
            allocation_ratio=record.disk_ratio if record.disk_ratio is not None else oc.disk_ratio,
        ),
    }


def _used(record: HostRecord) -> dict[ResourceClass, int]:
    out: dict[ResourceClass, int] = {}
    for name, amount in record.used.items():
        try:
            out[ResourceClass(name)] = amount
        except ValueError:
            continue  # a resource class from a newer controller: not ours to count
    return out


def host_state(record: HostRecord, config: ControllerConfig, now: float) -> HostState:
    """The scheduler's view of one host."""
    return HostState(
        host_id=record.id,
        inventories=inventories(record, config),
        used=_used(record),
        enabled=record.enabled,
        maintenance=record.maintenance,
        up=host_is_up(record, now, config.down_after_s),
        down_since=down_since(record, now, config.down_after_s),
        has_hw_virt=record.hw_virt,
        hypervisor_type=record.hypervisor_type.lower(),
        networks=frozenset(record.networks),
        bridges=frozenset(record.bridges),
        vm_count=record.vm_count,
        max_vms=record.max_vms,
        generation=record.generation,
    )


def snapshot(records: Iterable[HostRecord], config: ControllerConfig, now: float) -> FleetSnapshot:
    """The whole fleet as the scheduler sees it at ``now``."""
    return FleetSnapshot(hosts=tuple(host_state(r, config, now) for r in records), now=now)


def policy(config: ControllerConfig) -> PlacementPolicy:
    return PlacementPolicy(
        strategy=Strategy(config.strategy),
        n_plus_one=config.n_plus_one,
        max_alternates=max(0, config.max_attempts - 1),
    )


def amounts(vcpus: int, memory_mib: int, disk_gib: int) -> dict[ResourceClass, int]:
    return {ResourceClass.VCPU: vcpus, ResourceClass.MEMORY_MIB: memory_mib, ResourceClass.DISK_GIB: disk_gib}


def placement_request(
    name: str,
    resources: Mapping[ResourceClass, int],
    *,
    needs_hw_virt: bool = False,
    force_host: str | None = None,
    exclude: Iterable[str] = (),
) -> PlacementRequest:
    return PlacementRequest(
        vm_name=name,
        resources=resources,
        needs_hw_virt=needs_hw_virt,
        force_host=force_host,
        exclude_hosts=frozenset(exclude),
    )


def rejection_view(rejection: HostRejection) -> RejectionView:
    return RejectionView(host=rejection.host_id, rule=str(rejection.rule), message=rejection.message)


def resource_views(record: HostRecord, config: ControllerConfig) -> tuple[ResourceView, ...]:
    used = _used(record)
    views = []
    for resource, inv in inventories(record, config).items():
        amount = used.get(resource, 0)
        views.append(
            ResourceView(
                resource=str(resource),
                total=inv.total,
                reserved=inv.reserved,
                allocation_ratio=inv.allocation_ratio,
                capacity=inv.capacity,
                used=amount,
                free=inv.capacity - amount,
            )
        )
    return tuple(views)


def host_view(
    record: HostRecord, config: ControllerConfig, now: float, vms: Iterable[str] = (), *, detail: bool = False
) -> HostView:
    return HostView(
        host_id=record.id,
        hostname=record.hostname,
        status="up" if host_is_up(record, now, config.down_after_s) else "down",
        enabled=record.enabled,
        maintenance=record.maintenance,
        hypervisor_type=record.hypervisor_type,
        hw_virt=record.hw_virt,
        cpus=record.cpus,
        memory_mib=record.memory_mib,
        disk_gib=record.disk_gib,
        vm_count=record.vm_count,
        last_heartbeat=record.last_heartbeat,
        down_since=down_since(record, now, config.down_after_s),
        libvirt_uri=record.libvirt_uri,
        resources=resource_views(record, config) if detail else (),
        networks=record.networks if detail else (),
        bridges=record.bridges if detail else (),
        vms=tuple(vms) if detail else (),
    )


def vm_view(record: VmRecord) -> VmView:
    return VmView(
        uuid=record.uuid,
        name=record.name,
        host=record.host_id,
        status=record.status,
        power_state=record.power_state,
        desired_power=record.desired_power,
        task=record.task,
        vcpus=record.vcpus,
        max_vcpus=record.max_vcpus,
        memory_mib=record.memory_mib,
        max_memory_mib=record.max_memory_mib,
        disk_gib=record.disk_gib,
        autostart=record.autostart,
        persistent=record.persistent,
        cpu_time_ns=record.cpu_time_ns,
        created_at=record.created_at,
        updated_at=record.updated_at,
        last_error=record.last_error,
    )
