"""ORM tables of the controller's state store (SQLite by default, PostgreSQL in production).

The schema itself is owned by the alembic migrations in ``controller/db/migrations``; these
classes must match them (a test compares the two).
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from common.codec import from_wire, to_wire
from common.errors import InvalidRequest
from common.messages.base import replace
from common.messages.vm import DesiredPower, Lifecycle, PowerState, Task, VmSpec

E = TypeVar("E", bound=StrEnum)
log = logging.getLogger(__name__)


class EnumText(TypeDecorator[E], Generic[E]):
    """A string enum stored as its value in a plain string column (no database enum type, so a
    new member needs no migration); rows read back as enum members."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class SpecJson(TypeDecorator[VmSpec]):
    """A VM's spec as JSON text; a spec that no longer parses (written by another release) reads
    as None rather than making the VM unreadable."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        return "{}" if value is None else json.dumps(to_wire(without_secrets(value)), sort_keys=True)

    def process_result_value(self, value: Any, dialect: Dialect) -> VmSpec | None:
        data = json.loads(value) if value else None
        if not data:
            return None
        try:
            return from_wire(VmSpec, data, "spec")
        except InvalidRequest as exc:
            log.warning("a stored VM spec does not parse (%s); treating it as unknown", exc.message)
            return None


def without_secrets(spec: VmSpec) -> VmSpec:
    """``spec`` as it may be stored: without the VNC password.

    The password is needed only when the domain is defined (it travels to the agent in the
    create command and lives on in libvirt's definition, where ``vm export --secure`` reads it,
    for admins); the database never holds it, so a copy of the database does not leak it.
    """
    graphics = spec.graphics
    if graphics is None or graphics.password is None:
        return spec
    return replace(spec, graphics=replace(graphics, password=None))


class IntTuple(TypeDecorator[tuple[int, ...]]):
    """A tuple of integers as a JSON list."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        return json.dumps(list(value or ()))

    def process_result_value(self, value: Any, dialect: Dialect) -> tuple[int, ...]:
        return tuple(int(v) for v in json.loads(value or "[]"))


class Base(DeclarativeBase):
    pass


class GroupSettings:
    """The columns a host group sets for its hosts and a host may override
    (:data:`common.messages.placement.GROUP_SETTINGS`); NULL = not set."""

    cpu_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    ram_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    disk_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    reserved_memory_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reserved_cpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reserved_disk_gib: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Host(GroupSettings, Base):
    """A hypervisor as its agent reported it, plus the operator's settings for it."""

    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    #: why an operator disabled the host or put it in maintenance (Nova's disabled_reason)
    state_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: why the host's agent cannot reach libvirt (its last report said so); None when it can
    hypervisor_error: Mapped[str | None] = mapped_column(String(255), nullable=True)
    hypervisor_type: Mapped[str] = mapped_column(String(32), default="")
    hypervisor_version: Mapped[str] = mapped_column(String(32), default="")
    libvirt_uri: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    hw_virt: Mapped[bool] = mapped_column(Boolean, default=False)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    sockets: Mapped[int] = mapped_column(Integer, default=0)
    cores: Mapped[int] = mapped_column(Integer, default=0)
    threads: Mapped[int] = mapped_column(Integer, default=0)
    numa_cells: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    memory_free_mib: Mapped[int] = mapped_column(Integer, default=0)
    disk_gib: Mapped[int] = mapped_column(Integer, default=0)
    disk_free_gib: Mapped[int] = mapped_column(Integer, default=0)
    networks: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    bridges: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    reported_vms: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of VmStatus
    # Operator overrides (also those of GroupSettings); NULL = the group's, else the fleet default.
    max_vms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    group_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: JSON {resource: {reserved, allocation_ratio, min_unit, max_unit, step_size}} set by the operator.
    inventory_overrides: Mapped[str] = mapped_column(Text, default="{}")
    #: JSON of the last HostNetworkReport / HostTuningReport (null when the agent sends none).
    network_facts: Mapped[str] = mapped_column(Text, default="null")
    tuning_facts: Mapped[str] = mapped_column(Text, default="null")
    #: Bumped by every claim or release on this host: optimistic concurrency for claims.
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    agent_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_report: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Vm(Base):
    """A VM as the controller wants it (desired) and as its host last reported it (actual)."""

    __tablename__ = "vms"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    host_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("hosts.id"), nullable=True, index=True)
    #: indexed with ``task``: recovery reads the VMs in flight (building or with a task) only
    status: Mapped[Lifecycle] = mapped_column(EnumText(Lifecycle, 16), index=True)
    task: Mapped[Task | None] = mapped_column(EnumText(Task, 32), nullable=True, index=True)
    desired_power: Mapped[DesiredPower] = mapped_column(
        EnumText(DesiredPower, 16), default=DesiredPower.RUNNING
    )
    power_state: Mapped[PowerState] = mapped_column(EnumText(PowerState, 16), default=PowerState.NOSTATE)
    vcpus: Mapped[int] = mapped_column(Integer)
    max_vcpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    max_memory_mib: Mapped[int] = mapped_column(Integer)
    disk_gib: Mapped[int] = mapped_column(Integer)
    autostart: Mapped[bool] = mapped_column(Boolean, default=False)
    persistent: Mapped[bool] = mapped_column(Boolean, default=True)
    cpu_time_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    #: the VmSpec last sent to the agent (None until the VM is placed)
    spec: Mapped[VmSpec | None] = mapped_column(SpecJson(), nullable=False)  # None is stored as {}
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    server_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cpu_policy: Mapped[str] = mapped_column(String(16), default="shared")
    pcpus: Mapped[tuple[int, ...]] = mapped_column(IntTuple(), default=())  # dedicated host CPUs
    hugepage_size_kib: Mapped[int | None] = mapped_column(Integer, nullable=True)
    needs_hw_virt: Mapped[bool] = mapped_column(Boolean, default=False)
    #: its create allowed a disk in use by other guests (``--allow-shared-disk``): a build
    #: re-sent by recovery must say so again
    allow_shared_disk: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the controller instance (``controller_instances.id``) working on the VM's build or task;
    #: when that instance is no longer alive, recovery (controller.recovery) finishes the work
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class Allocation(Base):
    """An amount of one resource class that a VM holds on a host (placement's allocation)."""

    __tablename__ = "allocations"
    __table_args__ = (UniqueConstraint("vm_uuid", "resource", name="uq_allocation_vm_resource"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_uuid: Mapped[str] = mapped_column(String(36), ForeignKey("vms.uuid", ondelete="CASCADE"), index=True)
    host_id: Mapped[str] = mapped_column(String(64), ForeignKey("hosts.id"), index=True)
    resource: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)


class HostGroup(GroupSettings, Base):
    """Operator defaults shared by a set of hosts (between fleet defaults and per-host settings)."""

    __tablename__ = "host_groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class AuditRecord(Base):
    """One API call above reader, or one refused call: who, what, on what, with what result."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    #: the broker login the broker authenticated (None: the delivery carried no user_id)
    login: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: "ok" or the error type (PermissionDenied, RateLimited, NotFound...)
    result: Mapped[str] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    request_id: Mapped[str] = mapped_column(String(64))


class ServerGroup(Base):
    """An affinity or anti-affinity group of VMs."""

    __tablename__ = "server_groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[str] = mapped_column(String(32))
    max_per_host: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)


class ControllerInstance(Base):
    """A controller process that is alive while its heartbeat is recent (controller.db.liveness)."""

    __tablename__ = "controller_instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)


class Lease(Base):
    """A named lease one controller instance holds until ``expires_at`` (controller.db.liveness);
    the migration creates each lease's row, so acquiring is always an UPDATE."""

    __tablename__ = "controller_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)


class ApiRequest(Base):
    """One state-changing API request in the request journal (controller.request_journal):
    recorded as started before its handler runs and done, with its encoded reply, after."""

    __tablename__ = "api_requests"
    __table_args__ = (UniqueConstraint("caller", "idempotency_key", name="uq_api_requests_caller_key"),)

    #: the request envelope's id
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    #: the broker login the broker authenticated ("" when the delivery carried none)
    caller: Mapped[str] = mapped_column(String(128))
    #: the caller's idempotency key (the envelope's ``idem``), unique per caller
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: SHA-256 of the kind and the body: a key reused for another call is refused
    digest: Mapped[str] = mapped_column(String(64))
    #: "started" or "done"
    state: Mapped[str] = mapped_column(String(8))
    #: the encoded reply envelope (done only)
    reply: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
