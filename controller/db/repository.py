"""Database access: every query the controller makes, returning plain frozen records.

Nothing outside this module sees an ORM object. Writes that must be atomic (claims) are
single functions that run inside the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from common.codec import from_wire, to_wire
from common.errors import AlreadyExists, Conflict, NotFound
from common.messages.host import HostReport, VmChanges
from common.messages.placement import GROUP_SETTINGS
from common.messages.vm import Lifecycle, PowerState, VmSpec, VmStatus, VmView
from controller.db.models import Allocation, Host, HostGroup, ServerGroup, Vm

_HOSTS = cast(Table, Host.__table__)
_VMS = cast(Table, Vm.__table__)
_ALLOCATIONS = cast(Table, Allocation.__table__)


def _connection(session: Session | Connection) -> Connection:
    """Where a Core statement runs: a plain transaction's connection (the create path's claim and
    result transactions, which need no ORM session), or an ORM session's."""
    return session if isinstance(session, Connection) else session.connection()


# Built once: a statement object caches its compiled form's key, so executing the same object
# again skips building the statement and its cache key (SQLAlchemy's own cost, ~30 % of the
# create path's CPU under load with ORM statements built per call).
_CLAIM_GENERATION = (
    update(_HOSTS)
    .where(
        _HOSTS.c.id == bindparam("c_id"),
        _HOSTS.c.generation == bindparam("c_generation"),
        _HOSTS.c.updated_at == bindparam("c_updated_at"),
    )
    .values(generation=_HOSTS.c.generation + bindparam("c_count"))
)
_HOST_COLUMNS = tuple(_HOSTS.c)
_HOST_COLUMNS_NO_VMS = tuple(c for c in _HOSTS.c if c.name != "reported_vms")
_INSERT_VM = insert(_VMS)
_INSERT_ALLOCATION = insert(_ALLOCATIONS)
#: what a VM's reported status sets on its row (VmStatus field -> column)
_STATUS_COLUMNS = {
    "state": "power_state",
    "vcpus": "vcpus",
    "max_vcpus": "max_vcpus",
    "memory_mib": "memory_mib",
    "max_memory_mib": "max_memory_mib",
    "autostart": "autostart",
    "persistent": "persistent",
    "cpu_time_ns": "cpu_time_ns",
}


def _record_result_statement(*, lifecycle: bool) -> Any:
    values: dict[str, Any] = {column: bindparam(f"r_{column}") for column in _STATUS_COLUMNS.values()}
    values.update(updated_at=bindparam("r_now"), reported_at=bindparam("r_now"), task=None, last_error=None)
    if lifecycle:
        values["status"] = bindparam("r_status")
    return update(_VMS).where(_VMS.c.uuid == bindparam("r_uuid")).values(**values).returning(*_VMS.c)


_RECORD_RESULT = _record_result_statement(lifecycle=False)
_RECORD_RESULT_LIFECYCLE = _record_result_statement(lifecycle=True)


@dataclass(frozen=True, slots=True)
class HostRecord:
    """A host row plus what is allocated on it."""

    id: str
    hostname: str
    enabled: bool
    maintenance: bool
    hypervisor_type: str
    hypervisor_version: str
    libvirt_uri: str
    hw_virt: bool
    cpus: int
    numa_cells: int
    memory_mib: int
    memory_free_mib: int
    disk_gib: int
    disk_free_gib: int
    networks: tuple[str, ...]
    bridges: tuple[str, ...]
    reported_vms: tuple[VmStatus, ...]
    cpu_ratio: float | None
    ram_ratio: float | None
    disk_ratio: float | None
    reserved_memory_mib: int | None
    reserved_cpus: int | None
    reserved_disk_gib: int | None
    max_vms: int | None
    generation: int
    last_heartbeat: float | None
    last_report: float | None
    used: Mapping[str, int]
    vm_count: int
    group_name: str | None = None
    #: why it is disabled or in maintenance, as the operator said
    state_reason: str | None = None
    #: why its agent cannot reach libvirt (the host is degraded); None when it can
    hypervisor_error: str | None = None
    #: the host group's settings (cpu_ratio, ..., reserved_disk_gib; None = not set)
    group_settings: Mapping[str, Any] = field(default_factory=dict)
    inventory_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: plain data of the last HostNetworkReport / HostTuningReport, or None
    network: Any = None
    tuning: Any = None
    #: when the row last changed (with ``generation``: what tells an in-memory copy is stale)
    updated_at: float = 0.0


class VmRecord(VmView, frozen=True):
    """The controller's one model of a VM: what every client sees of it (the :class:`VmView`
    fields, declared once there) plus what only the controller needs."""

    spec: VmSpec | None = None
    idempotency_key: str | None = None
    reported_at: float | None = None
    server_group: str | None = None
    cpu_policy: str = "shared"
    pcpus: tuple[int, ...] = ()
    hugepage_size_kib: int | None = None
    needs_hw_virt: bool = False
    allow_shared_disk: bool = False

    @property
    def host_id(self) -> str | None:
        """The host the VM is placed on (``host`` in views)."""
        return self.host

    def view(self) -> VmView:
        """What clients are shown."""
        return VmView(**{name: getattr(self, name) for name in VmView.__struct_fields__})


def _group_settings(group: HostGroup | None) -> dict[str, Any]:
    return {} if group is None else {k: getattr(group, k) for k in GROUP_SETTINGS}


def _host_record(
    row: Host | Row[Any],
    used: Mapping[str, int],
    vm_count: int,
    group: HostGroup | None = None,
    *,
    include_vms: bool = True,
) -> HostRecord:
    return HostRecord(
        id=row.id,
        hostname=row.hostname,
        enabled=row.enabled,
        maintenance=row.maintenance,
        state_reason=row.state_reason,
        hypervisor_error=row.hypervisor_error,
        hypervisor_type=row.hypervisor_type,
        hypervisor_version=row.hypervisor_version,
        libvirt_uri=row.libvirt_uri,
        hw_virt=row.hw_virt,
        cpus=row.cpus,
        numa_cells=row.numa_cells,
        memory_mib=row.memory_mib,
        memory_free_mib=row.memory_free_mib,
        disk_gib=row.disk_gib,
        disk_free_gib=row.disk_free_gib,
        networks=tuple(json.loads(row.networks)),
        bridges=tuple(json.loads(row.bridges)),
        reported_vms=(
            tuple(from_wire(VmStatus, v, "reported_vms") for v in json.loads(row.reported_vms))
            if include_vms
            else ()
        ),
        cpu_ratio=row.cpu_ratio,
        ram_ratio=row.ram_ratio,
        disk_ratio=row.disk_ratio,
        reserved_memory_mib=row.reserved_memory_mib,
        reserved_cpus=row.reserved_cpus,
        reserved_disk_gib=row.reserved_disk_gib,
        max_vms=row.max_vms,
        generation=row.generation,
        last_heartbeat=row.last_heartbeat,
        last_report=row.last_report,
        used=dict(used),
        vm_count=vm_count,
        group_name=row.group_name,
        group_settings=_group_settings(group),
        inventory_overrides=json.loads(row.inventory_overrides),
        network=json.loads(row.network_facts),
        tuning=json.loads(row.tuning_facts),
        updated_at=row.updated_at,
    )


def _vm_record(row: Vm | Row[Any]) -> VmRecord:
    return VmRecord(
        uuid=row.uuid,
        name=row.name,
        host=row.host_id,
        status=row.status,
        power_state=row.power_state,
        desired_power=row.desired_power,
        task=row.task,
        vcpus=row.vcpus,
        max_vcpus=row.max_vcpus,
        memory_mib=row.memory_mib,
        max_memory_mib=row.max_memory_mib,
        disk_gib=row.disk_gib,
        autostart=row.autostart,
        persistent=row.persistent,
        cpu_time_ns=row.cpu_time_ns,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_error=row.last_error,
        spec=row.spec,
        idempotency_key=row.idempotency_key,
        reported_at=row.reported_at,
        server_group=row.server_group,
        cpu_policy=row.cpu_policy,
        pcpus=row.pcpus,
        hugepage_size_kib=row.hugepage_size_kib,
        needs_hw_virt=row.needs_hw_virt,
        allow_shared_disk=row.allow_shared_disk,
    )


# ---------------------------------------------------------------------------- hosts


def list_hosts(
    session: Session, host_ids: Iterable[str] | None = None, *, include_vms: bool = True
) -> list[HostRecord]:
    """Hosts with their allocations; generations are read *before* usage (see claim()).

    ``include_vms=False`` leaves ``reported_vms`` empty: decoding every VM a host reported
    is most of the cost of reading a host, and placement never needs them.
    """
    # Core rows, not ORM objects: reading a host is on every report written, every sync that
    # finds a change and every claim that lost its compare-and-set.
    query = select(*_HOST_COLUMNS if include_vms else _HOST_COLUMNS_NO_VMS).order_by(_HOSTS.c.id)
    allocations = select(Allocation.host_id, Allocation.resource, func.sum(Allocation.amount)).group_by(
        Allocation.host_id, Allocation.resource
    )
    counts_query = select(Vm.host_id, func.count()).where(Vm.host_id.is_not(None)).group_by(Vm.host_id)
    if host_ids is not None:
        wanted = list(host_ids)
        query = query.where(_HOSTS.c.id.in_(wanted))
        allocations = allocations.where(Allocation.host_id.in_(wanted))
        counts_query = counts_query.where(Vm.host_id.in_(wanted))
    hosts = list(session.execute(query))  # the session's: pending ORM changes are flushed first
    used: dict[str, dict[str, int]] = {}
    for host_id, resource, amount in session.execute(allocations):
        used.setdefault(host_id, {})[resource] = int(amount)
    counts = {host_id: int(n) for host_id, n in session.execute(counts_query)}
    group_names = {h.group_name for h in hosts if h.group_name}
    groups = (
        {g.name: g for g in session.scalars(select(HostGroup).where(HostGroup.name.in_(group_names)))}
        if group_names
        else {}
    )
    return [
        _host_record(
            h,
            used.get(h.id, {}),
            int(counts.get(h.id, 0)),
            groups.get(h.group_name or ""),
            include_vms=include_vms,
        )
        for h in hosts
    ]


@dataclass(frozen=True, slots=True)
class HostMarker:
    """What tells a host's in-memory copy is stale: its generation and row update time."""

    generation: int
    updated_at: float
    last_heartbeat: float | None


def host_markers(session: Session) -> dict[str, HostMarker]:
    """Every host's change markers (a cheap read: no text columns, no allocations)."""
    return {
        host_id: HostMarker(int(generation), float(updated_at), beat)
        for host_id, generation, updated_at, beat in session.execute(
            select(Host.id, Host.generation, Host.updated_at, Host.last_heartbeat)
        )
    }


def host_groups_fingerprint(session: Session) -> tuple[object, ...]:
    """All host groups' settings as one comparable value (a change reaches every member)."""
    return tuple(
        (g.name, *(getattr(g, k) for k in GROUP_SETTINGS))
        for g in session.scalars(select(HostGroup).order_by(HostGroup.name))
    )


def get_host(session: Session, host_id: str, *, include_vms: bool = True) -> HostRecord:
    records = list_hosts(session, [host_id], include_vms=include_vms)
    if not records:
        raise NotFound(f"host {host_id!r} is not known (has its agent ever reported?)")
    return records[0]


@dataclass(frozen=True, slots=True)
class ReportApplied:
    """What writing a full report did: drift notes, and how many of the host's VM rows it could
    not speak for (the controller changed them after the report was taken; see
    :func:`_apply_vm_status`). A report with such VMs must not be taken as the host's settled
    state: the agent's next report, even if it says the same, is written for them."""

    notes: list[str]
    deferred: int = 0


def record_report(session: Session, report: HostReport, now: float) -> ReportApplied:
    """Store an agent's report; update reported power states."""
    row = session.get(Host, report.host_id)
    if row is None:
        row = Host(id=report.host_id, created_at=now, generation=0, report_seq=0)
        session.add(row)
    elif report.started_at == row.agent_started_at and report.seq < row.report_seq:
        return ReportApplied([])  # an older report overtaken by a newer one: ignore
    if report.hypervisor_error is not None and row.hostname:
        # The agent cannot reach libvirt: its facts and VMs are not news. Keep what we have,
        # note why (the host is degraded and takes nothing) and that the agent is alive.
        row.hypervisor_error = report.hypervisor_error[:255]
        row.agent_started_at = report.started_at
        row.report_seq = report.seq
        row.last_heartbeat = now
        row.updated_at = now
        return ReportApplied([])
    row.hypervisor_error = report.hypervisor_error[:255] if report.hypervisor_error else None
    row.hostname = report.hostname
    row.hypervisor_type = report.hypervisor_type
    row.hypervisor_version = report.hypervisor_version
    row.libvirt_uri = report.libvirt_uri
    row.agent_version = report.agent_version
    row.hw_virt = report.hw_virt
    row.cpus = report.cpu.cpus
    row.sockets = report.cpu.sockets
    row.cores = report.cpu.cores
    row.threads = report.cpu.threads
    row.numa_cells = report.cpu.numa_cells
    row.memory_mib = report.memory_mib
    row.memory_free_mib = report.memory_free_mib
    row.disk_gib = report.storage.capacity_gib if report.storage else 0
    row.disk_free_gib = report.storage.available_gib if report.storage else 0
    row.networks = json.dumps(sorted(report.networks))
    row.bridges = json.dumps(sorted(report.bridges))
    row.reported_vms = json.dumps(to_wire(report.vms))
    row.network_facts = json.dumps(to_wire(report.network))
    row.tuning_facts = json.dumps(to_wire(report.tuning))
    row.agent_started_at = report.started_at
    row.report_seq = report.seq
    row.last_report = now
    row.last_heartbeat = now
    row.updated_at = now
    if report.hypervisor_error is not None:
        return ReportApplied([])  # a first report already degraded: its (empty) VM list is not the host's
    return _apply_reported_vms(session, report, now)


def _apply_reported_vms(session: Session, report: HostReport, now: float) -> ReportApplied:
    """A full report: every VM row of the host against what the host lists (absent = missing)."""
    seen = {vm.uuid: vm for vm in report.vms}
    rows = list(session.scalars(select(Vm).where(Vm.host_id == report.host_id).options(defer(Vm.spec))))
    notes = (_apply_vm_status(vm, seen.get(vm.uuid), report.host_id, report.reported_at, now) for vm in rows)
    deferred = sum(1 for vm in rows if _changed_after(vm, report.reported_at))
    return ReportApplied([note for note in notes if note is not None], deferred)


def record_vm_changes(session: Session, changes: VmChanges, now: float) -> list[str] | None:
    """Apply an agent's delta to the VM rows it names, by the same rule as a full report.

    Only those rows change; the host row takes the delta's seq (deltas and full reports share
    one ordering, so an older one of either kind is dropped afterwards), and its ``reported_vms``
    (the last full report's list) loses the domains the delta says are gone, so that a VM just
    deleted is not shown as an unknown domain on its host until the next full report. A changed
    domain stays as the full report listed it (rewriting the list on every delta would cost
    O(VMs) per change). Returns drift notes, or None when the delta is dropped:
    older than the newest report or delta applied, or from an agent run whose first full report
    is not recorded yet (that report, sent at the agent's start, lists every VM anyway).
    """
    result = session.execute(
        update(Host)
        .where(Host.id == changes.host_id)
        .where(Host.agent_started_at == changes.started_at)
        .where(Host.report_seq < changes.seq)
        .values(report_seq=changes.seq)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return None
    if changes.gone:
        _forget_reported(session, changes.host_id, set(changes.gone))
    statuses: dict[str, VmStatus | None] = {vm.uuid: vm for vm in changes.vms}
    statuses.update(dict.fromkeys(changes.gone))
    rows = session.scalars(
        select(Vm).where(Vm.host_id == changes.host_id, Vm.uuid.in_(statuses)).options(defer(Vm.spec))
    )
    notes = (
        _apply_vm_status(vm, statuses[vm.uuid], changes.host_id, changes.reported_at, now) for vm in rows
    )
    return [note for note in notes if note is not None]


def _forget_reported(session: Session, host_id: str, gone: set[str]) -> None:
    """Drop ``gone`` domains from the host's last full report (only deletes and domains removed
    by hand send them: rare enough to rewrite the list for)."""
    listed = session.scalar(select(Host.reported_vms).where(Host.id == host_id))
    vms = json.loads(listed) if listed else []
    kept = [vm for vm in vms if vm.get("uuid") not in gone]
    if len(kept) != len(vms):
        session.execute(
            update(Host)
            .where(Host.id == host_id)
            .values(reported_vms=json.dumps(kept))
            .execution_options(synchronize_session=False)
        )


def _changed_after(vm: Vm, reported_at: float) -> bool:
    """The controller changed ``vm`` after the agent took the report stamped ``reported_at``:
    the report cannot know about it yet (e.g. a create finishing while the report was queued),
    so it leaves the row alone (and a full report is not the host's settled state)."""
    return vm.updated_at > reported_at


def _apply_vm_status(
    vm: Vm, status: VmStatus | None, host_id: str, reported_at: float, now: float
) -> str | None:
    """The one rule for a VM row and what its host reported (None: the host has no such domain),
    for full reports and deltas alike. Returns a drift note, if any."""
    if _changed_after(vm, reported_at):
        return None
    if status is None:
        # A VM still building may not be defined yet; anything else is missing.
        if vm.status is not Lifecycle.BUILDING and vm.power_state is not PowerState.MISSING:
            vm.power_state = PowerState.MISSING
            vm.reported_at = now
            return f"{vm.name}: missing on {host_id}"
        return None
    values = {
        "power_state": status.state,
        "vcpus": status.vcpus,
        "max_vcpus": status.max_vcpus,
        "memory_mib": status.memory_mib,
        "max_memory_mib": status.max_memory_mib,
        "autostart": status.autostart,
        "persistent": status.persistent,
    }
    changed = {k: v for k, v in values.items() if getattr(vm, k) != v}
    if not changed:
        return None  # nothing to write: keeps reports cheap on hosts with many VMs
    note = None
    if "power_state" in changed and vm.status is not Lifecycle.BUILDING:
        note = f"{vm.name}: {vm.power_state.value} -> {status.state.value}"
    for key, value in changed.items():
        setattr(vm, key, value)
    vm.cpu_time_ns = status.cpu_time_ns
    vm.reported_at = now
    return note


def record_heartbeats(session: Session, beats: Mapping[str, float]) -> None:
    """Write many hosts' last heartbeat in one batched UPDATE (never moving one back in time).

    Rows are updated in host id order, the order a batch of claims locks its hosts in
    (``ControllerService._claim_batch``): two transactions that lock several host rows in one
    order never deadlock (PostgreSQL)."""
    hosts = _HOSTS
    session.execute(
        update(hosts)
        .where(hosts.c.id == bindparam("b_id"))
        .where(hosts.c.last_heartbeat.is_(None) | (hosts.c.last_heartbeat < bindparam("b_beat")))
        .values(last_heartbeat=bindparam("b_beat")),
        [{"b_id": host_id, "b_beat": when} for host_id, when in sorted(beats.items())],
    )


def set_host_fields(session: Session, host_id: str, values: Mapping[str, Any], now: float) -> None:
    row = session.get(Host, host_id)
    if row is None:
        raise NotFound(f"host {host_id!r} is not known")
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_at = now


# ---------------------------------------------------------------------------- VMs


def list_vms(
    session: Session, host_id: str | None = None, *, status: Lifecycle | None = None
) -> list[VmRecord]:
    query = select(Vm).order_by(Vm.name)
    if host_id is not None:
        query = query.where(Vm.host_id == host_id)
    if status is not None:
        query = query.where(Vm.status == status)
    return [_vm_record(v) for v in session.scalars(query)]


def find_vm(session: Session, name: str) -> VmRecord | None:
    row = session.scalars(select(Vm).where(Vm.name == name)).first()
    return None if row is None else _vm_record(row)


def get_vm(session: Session, name: str) -> VmRecord:
    record = find_vm(session, name)
    if record is None:
        raise NotFound(f"VM {name!r} does not exist")
    return record


def get_vm_by_uuid(session: Session, uuid: str) -> VmRecord:
    found = find_vm_by_uuid(session, uuid)
    if found is None:
        raise NotFound(f"VM {uuid} does not exist")
    return found


def find_vm_by_uuid(session: Session, uuid: str) -> VmRecord | None:
    row = session.get(Vm, uuid)
    return None if row is None else _vm_record(row)


def find_vm_by_key(session: Session, key: str) -> VmRecord | None:
    row = session.scalars(select(Vm).where(Vm.idempotency_key == key)).first()
    return None if row is None else _vm_record(row)


def update_vm(session: Session, uuid: str, now: float, **values: Any) -> None:
    session.execute(update(Vm).where(Vm.uuid == uuid).values(updated_at=now, **values))


def update_vm_returning(session: Session | Connection, uuid: str, now: float, **values: Any) -> VmRecord:
    """:func:`update_vm` and the VM as it is now, in one statement (UPDATE ... RETURNING).

    A Core statement on the table: the row comes back as a plain row, no ORM object is loaded
    (this records every create's and every action's result)."""
    row = (
        _connection(session)
        .execute(update(_VMS).where(_VMS.c.uuid == uuid).values(updated_at=now, **values).returning(*_VMS.c))
        .first()
    )
    if row is None:
        raise NotFound(f"VM {uuid} does not exist")
    return _vm_record(row)


def record_result(
    session: Session | Connection,
    uuid: str,
    now: float,
    status: VmStatus | None,
    lifecycle: Lifecycle | None = None,
) -> VmRecord:
    """An operation's result on the VM's row, in one precompiled UPDATE ... RETURNING: the task
    and error cleared, the state the agent reported (and ``lifecycle``, if given); the VM as it
    is now. Every create and every VM action ends here."""
    if status is None:
        extra = {} if lifecycle is None else {"status": lifecycle}
        return update_vm_returning(session, uuid, now, task=None, last_error=None, **extra)
    params = {f"r_{column}": getattr(status, field) for field, column in _STATUS_COLUMNS.items()}
    params.update(r_uuid=uuid, r_now=now)
    statement = _RECORD_RESULT
    if lifecycle is not None:
        params["r_status"] = lifecycle
        statement = _RECORD_RESULT_LIFECYCLE
    row = _connection(session).execute(statement, params).first()
    if row is None:
        raise NotFound(f"VM {uuid} does not exist")
    return _vm_record(row)


def delete_vm(session: Session, uuid: str) -> None:
    """Forget a VM and its allocations; its host's generation moves (its usage changed)."""
    host_id = session.scalars(select(Vm.host_id).where(Vm.uuid == uuid)).first()
    if host_id is not None:
        session.execute(update(Host).where(Host.id == host_id).values(generation=Host.generation + 1))
    session.execute(delete(Allocation).where(Allocation.vm_uuid == uuid))
    session.execute(delete(Vm).where(Vm.uuid == uuid))


# ---------------------------------------------------------------------------- claims


def bump_generation(session: Session, host_id: str) -> None:
    """Bump the host's generation; in PostgreSQL this also takes the host row's lock until commit.

    Every change to a host's allocations goes through here first, so claims on one host are
    serialised and any snapshot that saw the old generation is known to be stale.
    """
    bumped = session.execute(update(Host).where(Host.id == host_id).values(generation=Host.generation + 1))
    if getattr(bumped, "rowcount", 0) != 1:
        raise NotFound(f"host {host_id!r} is not known")


def claim_generation(
    session: Session | Connection, host_id: str, generation: int, updated_at: float, *, count: int = 1
) -> bool:
    """Compare-and-set: move the host's generation ``count`` up (one per claim written in this
    transaction) only if the row is still at ``generation`` and ``updated_at`` (what the caller
    decided on). True when it was; the row is then locked (PostgreSQL) until commit, and the
    caller's view of the host is exactly the database's.

    One precompiled Core statement: this runs once per claimed host of every create.
    """
    bumped = _connection(session).execute(
        _CLAIM_GENERATION,
        {"c_id": host_id, "c_generation": generation, "c_updated_at": updated_at, "c_count": count},
    )
    return bumped.rowcount == 1


def insert_claims(
    session: Session | Connection,
    *,
    vms: Sequence[Mapping[str, Any]],
    allocations: Sequence[Mapping[str, Any]],
) -> None:
    """Write new VMs and their allocations: one INSERT of each kind, however many VMs.

    Call inside the transaction that moved each host's generation (:func:`claim_generation`)
    for the claims on it. Every VM row has the same keys, every allocation row
    ``vm_uuid, host_id, resource, amount``. A name already taken (by anyone, in any process)
    raises AlreadyExists and the transaction must be rolled back: no VM of the batch is written.
    """
    if not vms:
        return
    connection = _connection(session)
    try:
        # The VM rows first: allocations reference them.
        connection.execute(_INSERT_VM, list(vms))
    except IntegrityError as exc:
        # Names are unique in the schema: the index refuses a duplicate, whichever path
        # (another create, an import, another controller) got there first.
        names = ", ".join(repr(vm["name"]) for vm in vms)
        raise AlreadyExists(f"a VM named {names} already exists in the fleet") from exc
    if allocations:
        connection.execute(_INSERT_ALLOCATION, list(allocations))


def insert_claim(
    session: Session, *, vm: Mapping[str, Any], host_id: str, amounts: Mapping[str, int], new: bool = False
) -> None:
    """Write a VM (or re-home an existing one) and its allocations on ``host_id``.

    Call inside the transaction that bumped the host's generation (:func:`bump_generation` or
    :func:`claim_generation`) and checked its capacity. A duplicate name raises AlreadyExists.
    ``new``: the VM is known not to exist yet (a first claim: no row to re-home).
    """
    rows = [
        {"vm_uuid": vm["uuid"], "host_id": host_id, "resource": resource, "amount": amount}
        for resource, amount in amounts.items()
    ]
    existing = None if new else session.get(Vm, vm["uuid"])
    if existing is None:
        insert_claims(session, vms=[vm], allocations=rows)
        return
    # A reschedule: the VM moves, with the definition and pCPUs made for its new host.
    existing.host_id = host_id
    existing.status = Lifecycle(vm["status"])
    existing.spec = vm["spec"]
    existing.pcpus = vm["pcpus"]
    session.flush()
    if rows:  # one INSERT of every row
        session.connection().execute(_INSERT_ALLOCATION, rows)


def release(session: Session, vm_uuid: str, host_id: str) -> None:
    """Drop a VM's allocations and bump the host generation (others' snapshots are stale)."""
    session.execute(delete(Allocation).where(Allocation.vm_uuid == vm_uuid))
    session.execute(update(Host).where(Host.id == host_id).values(generation=Host.generation + 1))


def set_allocations(session: Session, vm_uuid: str, host_id: str, amounts: Mapping[str, int]) -> None:
    """Replace a VM's allocations (call after bump_generation and a capacity check)."""
    session.execute(delete(Allocation).where(Allocation.vm_uuid == vm_uuid))
    session.add_all(
        Allocation(vm_uuid=vm_uuid, host_id=host_id, resource=r, amount=a)
        for r, a in amounts.items()
        if a > 0
    )
    session.flush()


def allocations_of(session: Session, vm_uuid: str) -> dict[str, int]:
    return {
        r: int(a)
        for r, a in session.execute(
            select(Allocation.resource, Allocation.amount).where(Allocation.vm_uuid == vm_uuid)
        )
    }


def allocations_by_vm(session: Session) -> dict[str, dict[str, int]]:
    """Every VM's allocations: uuid -> resource -> amount."""
    out: dict[str, dict[str, int]] = {}
    for uuid, resource, amount in session.execute(
        select(Allocation.vm_uuid, Allocation.resource, Allocation.amount)
    ):
        out.setdefault(uuid, {})[resource] = int(amount)
    return out


def host_usage(session: Session, host_id: str) -> dict[str, int]:
    return {
        r: int(a)
        for r, a in session.execute(
            select(Allocation.resource, func.sum(Allocation.amount))
            .where(Allocation.host_id == host_id)
            .group_by(Allocation.resource)
        )
    }


def names_in_use(session: Session, names: Sequence[str]) -> set[str]:
    return set(session.scalars(select(Vm.name).where(Vm.name.in_(list(names)))))


def vm_uuids_in_use(session: Session | Connection, uuids: Sequence[str]) -> set[str]:
    """Which of ``uuids`` have a VM row (claims whose commit outcome was not seen)."""
    return set(_connection(session).scalars(select(_VMS.c.uuid).where(_VMS.c.uuid.in_(list(uuids)))))


# ---------------------------------------------------------------------------- groups


@dataclass(frozen=True, slots=True)
class HostGroupRecord:
    name: str
    settings: Mapping[str, Any]
    hosts: tuple[str, ...]


def upsert_host_group(session: Session, name: str, values: Mapping[str, Any], now: float) -> None:
    row = session.get(HostGroup, name)
    if row is None:
        row = HostGroup(name=name, created_at=now)
        session.add(row)
    for key, value in values.items():
        if value is not None:
            setattr(row, key, value)


def host_group_exists(session: Session, name: str) -> bool:
    return session.get(HostGroup, name) is not None


def list_host_groups(session: Session) -> list[HostGroupRecord]:
    members: dict[str, list[str]] = {}
    for host_id, group in session.execute(
        select(Host.id, Host.group_name).where(Host.group_name.is_not(None))
    ):
        if group is not None:
            members.setdefault(group, []).append(host_id)
    return [
        HostGroupRecord(g.name, _group_settings(g), tuple(sorted(members.get(g.name, []))))
        for g in session.scalars(select(HostGroup).order_by(HostGroup.name))
    ]


@dataclass(frozen=True, slots=True)
class ServerGroupRecord:
    name: str
    policy: str
    max_per_host: int
    members: Mapping[str, int]  # host -> VMs of the group placed there


def create_server_group(session: Session, name: str, policy: str, max_per_host: int, now: float) -> None:
    if session.get(ServerGroup, name) is not None:
        raise AlreadyExists(f"server group {name!r} already exists")
    session.add(ServerGroup(name=name, policy=policy, max_per_host=max_per_host, created_at=now))


def delete_server_group(session: Session, name: str) -> None:
    row = session.get(ServerGroup, name)
    if row is None:
        raise NotFound(f"server group {name!r} does not exist")
    in_use = session.scalars(select(Vm.name).where(Vm.server_group == name)).first()
    if in_use is not None:
        raise Conflict(f"server group {name!r} still has VMs (e.g. {in_use}); delete them first")
    session.delete(row)


def find_server_group(session: Session, name: str) -> ServerGroupRecord | None:
    """One server group and where its VMs are, or None (placement needs only the request's group)."""
    group = session.get(ServerGroup, name)
    if group is None:
        return None
    members = {
        host_id: int(count)
        for host_id, count in session.execute(
            select(Vm.host_id, func.count())
            .where(Vm.server_group == name, Vm.host_id.is_not(None))
            .group_by(Vm.host_id)
        )
        if host_id is not None
    }
    return ServerGroupRecord(group.name, group.policy, group.max_per_host, members)


def list_server_groups(session: Session) -> list[ServerGroupRecord]:
    members: dict[str, dict[str, int]] = {}
    for group, host_id, count in session.execute(
        select(Vm.server_group, Vm.host_id, func.count())
        .where(Vm.server_group.is_not(None), Vm.host_id.is_not(None))
        .group_by(Vm.server_group, Vm.host_id)
    ):
        if group is not None and host_id is not None:
            members.setdefault(group, {})[host_id] = int(count)
    return [
        ServerGroupRecord(g.name, g.policy, g.max_per_host, members.get(g.name, {}))
        for g in session.scalars(select(ServerGroup).order_by(ServerGroup.name))
    ]
