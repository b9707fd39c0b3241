"""Placement use cases beyond create: host settings and switches, capacity and drift,
host groups (shared defaults) and server groups (affinity / anti-affinity)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

from common.errors import NotFound
from common.messages import placement as msgs
from common.messages.vm import Lifecycle, PowerState
from common.transport.rpc import HandlerTable
from controller import fleet
from controller.db import repository as repo
from controller.scheduler.model import ResourceClass
from controller.service import ControllerService

log = logging.getLogger(__name__)

#: The host column of a resettable setting whose name is not the column's.
_COLUMNS = {"group": "group_name"}


def host_set(service: ControllerService, req: msgs.HostSet) -> msgs.Done:
    """Operator overrides for one host (ratios, reserves, limits, group)."""
    values: dict[str, object] = {}
    for name in msgs.GROUP_SETTINGS:
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    if req.max_vms is not None:
        values["max_vms"] = req.max_vms
    for name in req.reset:
        if name == "limits":
            values["inventory_overrides"] = "{}"
        else:
            values[_COLUMNS.get(name, name)] = None
    with service.tx() as s:
        host = repo.get_host(s, req.host)
        if req.group is not None:
            if not repo.host_group_exists(s, req.group):
                raise NotFound(
                    f"host group {req.group!r} does not exist; create it with `virtfleet hostgroup set`"
                )
            values["group_name"] = req.group
        if req.limits:
            limits = dict(host.inventory_overrides)
            for lim in req.limits:
                entry = {
                    k: v
                    for k, v in (
                        ("min_unit", lim.min_unit),
                        ("max_unit", lim.max_unit),
                        ("step_size", lim.step_size),
                    )
                    if v is not None
                }
                limits[lim.resource] = {**limits.get(lim.resource, {}), **entry}
            values["inventory_overrides"] = json.dumps(limits, sort_keys=True)
        # A changed ratio changes capacity: bump the generation so in-flight decisions re-check.
        repo.bump_generation(s, req.host)
        repo.set_host_fields(s, req.host, values, service.clock())
    service.hosts_changed(req.host)
    changed = ", ".join(f"{k}={v}" for k, v in values.items()) or "nothing"
    log.info("host %s settings: %s", req.host, changed)
    return msgs.Done(f"{req.host}: {changed}")


def host_state(service: ControllerService, req: msgs.HostSwitch) -> msgs.Done:
    """Enable/disable a host or put it in/out of maintenance (no new VMs while off/in maintenance)."""
    values: dict[str, object] = {}
    if req.enabled is not None:
        values["enabled"] = req.enabled
    if req.maintenance is not None:
        values["maintenance"] = req.maintenance
    with service.tx() as s:
        current = repo.get_host(s, req.host)
        enabled = current.enabled if req.enabled is None else req.enabled
        maintenance = current.maintenance if req.maintenance is None else req.maintenance
        # The reason is kept while the host is still out of service; putting it back in
        # service forgets it, and a new switch without a reason keeps the old one.
        if enabled and not maintenance:
            values["state_reason"] = None
        elif req.reason:
            values["state_reason"] = req.reason[:255]
        repo.bump_generation(s, req.host)
        repo.set_host_fields(s, req.host, values, service.clock())
    service.hosts_changed(req.host)
    words = []
    if req.enabled is not None:
        words.append("enabled" if req.enabled else "disabled")
    if req.maintenance is not None:
        words.append("in maintenance" if req.maintenance else "out of maintenance")
    return msgs.Done(
        f"{req.host}: {' and '.join(words) or 'unchanged'}" + (f" ({req.reason})" if req.reason else "")
    )


#: The power states in which a domain holds its vCPUs and memory on the host.
_HOLDING = (PowerState.RUNNING, PowerState.PAUSED, PowerState.BLOCKED)


def _changed_since_report(record: repo.HostRecord, vm: repo.VmRecord) -> bool:
    """The controller changed ``vm`` after the host's last full report was written (created or
    moved here, resized, powered on or off since): that report cannot speak for it."""
    return record.last_report is None or vm.updated_at > record.last_report


def reported_usage(record: repo.HostRecord, vms: Iterable[repo.VmRecord] = ()) -> dict[str, int]:
    """What the host's domains use, as the host said it (pure): its last full report, with the
    VMs the controller changed since (``vms`` of the host) as their commands' replies and the
    host's deltas said (a VM created after the report is counted, not missed until the next)."""
    newer = {
        vm.uuid: vm for vm in vms if vm.status is not Lifecycle.BUILDING and _changed_since_report(record, vm)
    }
    listed = [v for v in record.reported_vms if v.uuid not in newer and v.state in _HOLDING]
    told = [vm for vm in newer.values() if vm.power_state in _HOLDING]
    return {
        "VCPU": sum(v.vcpus for v in listed) + sum(vm.vcpus for vm in told),
        "MEMORY_MIB": sum(v.memory_mib for v in listed) + sum(vm.memory_mib for vm in told),
        "DISK_GIB": max(0, record.disk_gib - record.disk_free_gib),
    }


def drift_notes(
    record: repo.HostRecord,
    vms: Iterable[repo.VmRecord],
    claims: Mapping[str, Mapping[str, int]] | None = None,
) -> list[str]:
    """What the controller claimed on a host vs what its agent last reported (pure).

    ``claims``: each VM's allocations (uuid -> resource -> amount). A VM is compared with what it
    claims, not with its record, which the reports keep up to date with what the host runs (so a VM
    grown by hand with virsh would otherwise never show). A VM the controller changed after the last
    full report was written (created or moved here, resized, ballooned since: commands and deltas
    keep its state, the full report comes every report interval) is not judged by that report.
    """
    notes: list[str] = []
    claims = claims or {}
    known = {v.uuid: v for v in vms}
    reported = {v.uuid: v for v in record.reported_vms}
    for seen in record.reported_vms:
        if seen.uuid not in known:
            kind = "unmanaged" if not seen.managed else "unknown"
            notes.append(
                f"{kind} domain {seen.name} ({seen.state}, {seen.vcpus} vCPU, {seen.memory_mib} MiB) "
                "is not claimed by virtfleet"
            )
    for vm in known.values():
        if vm.status is Lifecycle.BUILDING or _changed_since_report(record, vm):
            continue  # the last full report cannot speak for it (see above)
        status = reported.get(vm.uuid)
        if status is None:
            notes.append(f"VM {vm.name} is claimed here but the host does not report it")
        else:
            claim = claims.get(vm.uuid, {})
            vcpus = claim.get(str(ResourceClass.VCPU), claim.get(str(ResourceClass.PCPU), vm.vcpus))
            memory = claim.get(str(ResourceClass.MEMORY_MIB), vm.memory_mib)
            if status.memory_mib > memory or status.vcpus > vcpus:
                notes.append(
                    f"VM {vm.name} uses {status.vcpus} vCPU / {status.memory_mib} MiB, "
                    f"claimed {vcpus} vCPU / {memory} MiB"
                )
    return notes


def capacity(service: ControllerService, req: msgs.CapacityRequest) -> msgs.CapacityReport:
    """Per host and resource: total, reserved, ratio, capacity, used, free, limits, reported use."""
    now = service.clock()
    with service.tx() as s:
        records = repo.list_hosts(s, None if req.host is None else [req.host])
        if req.host is not None and not records:
            raise NotFound(f"host {req.host!r} is not known")
        vms = repo.list_vms(s)
        claims = repo.allocations_by_vm(s)
    by_host: dict[str, list[repo.VmRecord]] = {}
    for vm in vms:
        if vm.host_id is not None:
            by_host.setdefault(vm.host_id, []).append(vm)
    hosts = []
    for record in records:
        fresh = service.fleet.freshen(record)
        state = fleet.host_state(fresh, service.config, now)
        sources = fleet.inventory_sources(record, service.config)
        reported = reported_usage(record, by_host.get(record.id, []))
        resources = []
        for rc, inv in sorted(state.inventories.items(), key=lambda kv: str(kv[0])):
            resources.append(
                fleet.resource_view(
                    msgs.ResourceCapacity,
                    rc,
                    inv,
                    state.used.get(rc, 0),
                    min_unit=inv.min_unit,
                    max_unit=inv.effective_max_unit,
                    step_size=inv.step_size,
                    reported=reported.get(str(rc)),
                    source=sources.get(rc, "host"),
                )
            )
        hosts.append(
            msgs.HostCapacity(
                host=record.id,
                status=fleet.host_status(fresh, now, service.config.down_after_s),
                group=record.group_name,
                resources=tuple(resources),
                drift=tuple(drift_notes(record, by_host.get(record.id, []), claims)),
            )
        )
    return msgs.CapacityReport(tuple(hosts))


def hostgroup_set(service: ControllerService, req: msgs.HostGroupSet) -> msgs.Done:
    values = {k: getattr(req, k) for k in msgs.GROUP_SETTINGS}
    with service.tx() as s:
        repo.upsert_host_group(s, req.name, values, service.clock())
        for record in repo.list_hosts(s):
            if record.group_name == req.name:
                repo.bump_generation(s, record.id)
    service.fleet.load(service.clock())  # the group's settings reach every member
    return msgs.Done(f"host group {req.name} saved")


def hostgroup_list(service: ControllerService, _req: msgs.CapacityRequest) -> msgs.HostGroupList:
    with service.tx() as s:
        groups = repo.list_host_groups(s)
    return msgs.HostGroupList(
        tuple(
            msgs.HostGroupView(
                name=g.name, hosts=g.hosts, **{k: g.settings.get(k) for k in msgs.GROUP_SETTINGS}
            )
            for g in groups
        )
    )


def _group_view(g: repo.ServerGroupRecord) -> msgs.ServerGroupView:
    return msgs.ServerGroupView(
        name=g.name, policy=g.policy, max_per_host=g.max_per_host, members=dict(g.members)
    )


def group_create(service: ControllerService, req: msgs.ServerGroupCreate) -> msgs.ServerGroupView:
    with service.tx() as s:
        repo.create_server_group(s, req.name, req.policy, req.max_per_host, service.clock())
    return msgs.ServerGroupView(name=req.name, policy=req.policy, max_per_host=req.max_per_host, members={})


def group_delete(service: ControllerService, req: msgs.ServerGroupRef) -> msgs.Done:
    with service.tx() as s:
        repo.delete_server_group(s, req.name)
    return msgs.Done(f"server group {req.name} deleted")


def group_list(service: ControllerService, _req: msgs.CapacityRequest) -> msgs.ServerGroupList:
    with service.tx() as s:
        groups = repo.list_server_groups(s)
    return msgs.ServerGroupList(tuple(_group_view(g) for g in groups))


def register(table: HandlerTable, service: ControllerService) -> None:
    """Serve the placement API calls."""
    table.register(msgs.API_HOST_SET, lambda req: host_set(service, req))
    table.register(msgs.API_HOST_STATE, lambda req: host_state(service, req))
    table.register(msgs.API_HOST_CAPACITY, lambda req: capacity(service, req))
    table.register(msgs.API_HOSTGROUP_SET, lambda req: hostgroup_set(service, req))
    table.register(msgs.API_HOSTGROUP_LIST, lambda req: hostgroup_list(service, req))
    table.register(msgs.API_GROUP_CREATE, lambda req: group_create(service, req))
    table.register(msgs.API_GROUP_DELETE, lambda req: group_delete(service, req))
    table.register(msgs.API_GROUP_LIST, lambda req: group_list(service, req))
