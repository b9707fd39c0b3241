"""Pure translation between stored records and the scheduler's model and the API's views.

Decides, given ``now`` and the configuration, whether a host is up, what each of its
inventories is (reported totals, operator overrides, fleet defaults) and what a request
for a VM asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from common.messages.api import HostView, RejectionView, ResourceView
from common.messages.vm import HostStatus, VmView
from controller import tuning_inventory
from controller.config import ControllerConfig
from controller.db.repository import HostRecord, ServerGroupRecord, VmRecord
from controller.scheduler.model import (
    FleetSnapshot,
    GroupPolicy,
    HostRejection,
    HostState,
    Inventory,
    PlacementPolicy,
    PlacementRequest,
    ResourceClass,
    ServerGroup,
    Strategy,
)

V = TypeVar("V", bound=ResourceView)

#: Hypervisors that cannot overcommit memory (the ops notes: Xen cannot, KVM can).
NO_MEMORY_OVERCOMMIT = frozenset({"xen"})


def host_is_up(record: HostRecord, now: float, down_after_s: float) -> bool:
    """Up when the last heartbeat is recent enough."""
    return record.last_heartbeat is not None and now - record.last_heartbeat <= down_after_s


def host_status(record: HostRecord, now: float, down_after_s: float) -> HostStatus:
    """Down without a recent heartbeat; degraded while its agent cannot reach libvirt; else up."""
    if not host_is_up(record, now, down_after_s):
        return HostStatus.DOWN
    return HostStatus.UP if record.hypervisor_error is None else HostStatus.DEGRADED


def shown_reason(record: HostRecord) -> str | None:
    """The reason shown with a host: the operator's (disabled, maintenance) and why it is
    degraded, whichever are set."""
    reasons = [r for r in (record.state_reason, record.hypervisor_error) if r]
    return "; ".join(reasons) or None


def down_since(record: HostRecord, now: float, down_after_s: float) -> float | None:
    """When a down host was last heard of (None if up or never heard of)."""
    if host_is_up(record, now, down_after_s):
        return None
    return record.last_heartbeat


def _setting(record: HostRecord, name: str, fleet_default: float) -> tuple[float, str]:
    """A ratio or reserve: the host's own value, else its group's, else the fleet default."""
    own = getattr(record, name)
    if own is not None:
        return own, "host"
    grouped = record.group_settings.get(name)
    if grouped is not None:
        return grouped, f"group:{record.group_name}"
    return fleet_default, "fleet"


#: resource -> (total attribute, ratio setting, reserved setting)
_BASE_RESOURCES: dict[ResourceClass, tuple[str, str, str]] = {
    ResourceClass.VCPU: ("cpus", "cpu_ratio", "reserved_cpus"),
    ResourceClass.MEMORY_MIB: ("memory_mib", "ram_ratio", "reserved_memory_mib"),
    ResourceClass.DISK_GIB: ("disk_gib", "disk_ratio", "reserved_disk_gib"),
}


def inventory_sources(record: HostRecord, config: ControllerConfig) -> dict[ResourceClass, str]:
    """Where each base inventory's ratio came from (``host``, ``group:NAME`` or ``fleet``)."""
    oc = config.overcommit
    return {
        rc: _setting(record, ratio, getattr(oc, ratio))[1]
        for rc, (_total, ratio, _res) in _BASE_RESOURCES.items()
    }


def inventories(record: HostRecord, config: ControllerConfig) -> dict[ResourceClass, Inventory]:
    """vCPU, memory and disk inventories: reported totals, reserved amounts, ratios, unit limits.

    Precedence for each ratio and reserve: the host's own setting, its host group's, the fleet
    default. A hypervisor that cannot overcommit memory (Xen) gets memory ratio 1.0 whatever
    is set. Min/max unit and step size come from the host's limits (Nova placement's rules).
    """
    oc = config.overcommit
    out: dict[ResourceClass, Inventory] = {}
    for rc, (total_attr, ratio_name, reserved_name) in _BASE_RESOURCES.items():
        total = int(getattr(record, total_attr))
        ratio, _source = _setting(record, ratio_name, getattr(oc, ratio_name))
        reserved, _ = _setting(record, reserved_name, getattr(oc, reserved_name))
        if rc is ResourceClass.MEMORY_MIB and record.hypervisor_type.lower() in NO_MEMORY_OVERCOMMIT:
            ratio = 1.0
        limits = record.inventory_overrides.get(str(rc), {})
        out[rc] = Inventory.for_class(
            rc,
            total,
            reserved=min(total, int(reserved)),
            allocation_ratio=float(ratio),
            min_unit=int(limits.get("min_unit") or 1),
            max_unit=limits.get("max_unit"),
            step_size=int(limits.get("step_size") or 1),
        )
    return out


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
    tuned = tuning_inventory.from_record(record)
    return HostState(
        host_id=record.id,
        inventories=tuned.inventories(inventories(record, config)),
        used=_used(record),
        enabled=record.enabled,
        maintenance=record.maintenance,
        state_reason=record.state_reason,
        hypervisor_error=record.hypervisor_error,
        up=host_is_up(record, now, config.down_after_s),
        down_since=down_since(record, now, config.down_after_s),
        has_hw_virt=record.hw_virt,
        hypervisor_type=record.hypervisor_type.lower(),
        networks=frozenset(record.networks),
        bridges=frozenset(record.bridges),
        vm_count=record.vm_count,
        max_vms=record.max_vms,
        generation=record.generation,
        free_pcpus=tuned.free_pcpus,
        pcpu_numa=tuned.pcpu_numa,
        cpus=record.cpus,
    )


def server_group(record: ServerGroupRecord) -> ServerGroup:
    return ServerGroup(
        name=record.name,
        policy=GroupPolicy(record.policy),
        max_per_host=record.max_per_host,
        members=record.members,
    )


def snapshot(
    records: Iterable[HostRecord],
    config: ControllerConfig,
    now: float,
    groups: Iterable[ServerGroupRecord] = (),
) -> FleetSnapshot:
    """The whole fleet as the scheduler sees it at ``now``, with the server groups and where
    their VMs run (the anti-/affinity filters and weighers need them)."""
    return FleetSnapshot(
        hosts=tuple(host_state(r, config, now) for r in records),
        server_groups=tuple(server_group(g) for g in groups),
        now=now,
    )


def policy(config: ControllerConfig) -> PlacementPolicy:
    return PlacementPolicy(
        strategy=Strategy(config.strategy),
        n_plus_one=config.n_plus_one,
        max_alternates=max(0, config.max_attempts - 1),
        choose_among=config.choose_among,
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
    networks: Iterable[str] = (),
    bridges: Iterable[str] = (),
    group: str | None = None,
    highest_cpu: int | None = None,
) -> PlacementRequest:
    return PlacementRequest(
        vm_name=name,
        resources=resources,
        needs_hw_virt=needs_hw_virt,
        networks=frozenset(networks),
        bridges=frozenset(bridges),
        group=group,
        force_host=force_host,
        exclude_hosts=frozenset(exclude),
        highest_cpu=highest_cpu,
    )


def rejection_view(rejection: HostRejection) -> RejectionView:
    return RejectionView(host=rejection.host_id, rule=str(rejection.rule), message=rejection.message)


def resource_view(cls: type[V], resource: ResourceClass, inv: Inventory, used: int, **more: Any) -> V:
    """One resource of a host as clients see it: ``cls`` (a :class:`ResourceView`, or one with
    the ``more`` fields too) from its inventory and what is used of it."""
    return cls(
        resource=str(resource),
        total=inv.total,
        reserved=inv.reserved,
        allocation_ratio=inv.allocation_ratio,
        capacity=inv.capacity,
        used=used,
        free=inv.capacity - used,
        **more,
    )


def resource_views(record: HostRecord, config: ControllerConfig) -> tuple[ResourceView, ...]:
    used = _used(record)
    return tuple(
        resource_view(ResourceView, rc, inv, used.get(rc, 0))
        for rc, inv in inventories(record, config).items()
    )


def host_view(
    record: HostRecord, config: ControllerConfig, now: float, vms: Iterable[str] = (), *, detail: bool = False
) -> HostView:
    return HostView(
        host_id=record.id,
        hostname=record.hostname,
        status=host_status(record, now, config.down_after_s),
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
        state_reason=shown_reason(record),
    )


def vm_view(record: VmRecord) -> VmView:
    """What clients are shown of a VM."""
    return record.view()
