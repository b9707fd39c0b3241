"""Placement family: operator settings of hosts and groups, capacity views, server groups."""

from __future__ import annotations

import math
from typing import Annotated

from msgspec import Meta

from common.errors import InvalidRequest
from common.messages.api import API, ResourceView
from common.messages.base import Int64, Message
from common.messages.descriptor import Role, Timeout, api_call, query
from common.messages.limits import MAX_ITEMS, Count, Name, Text, Token
from common.messages.vm import HostStatus
from common.validation import check_name

#: Overcommit ratios: a host's, else its group's, else the fleet's.
RATIO_SETTINGS = ("cpu_ratio", "ram_ratio", "disk_ratio")
#: Resources held back for the host itself: a host's, else its group's, else the fleet's.
RESERVE_SETTINGS = ("reserved_memory_mib", "reserved_cpus", "reserved_disk_gib")
#: What a host group sets for its hosts (each host may override it).
GROUP_SETTINGS = (*RATIO_SETTINGS, *RESERVE_SETTINGS)
#: Settings that may be cleared back to the group/fleet default with ``--reset``.
HOST_SETTINGS = (*GROUP_SETTINGS, "max_vms", "group")
GROUP_POLICIES = ("affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity")
RESOURCE_NAMES = ("VCPU", "MEMORY_MIB", "DISK_GIB", "PCPU", "HUGEPAGES_2M", "HUGEPAGES_1G")


def _check_ratio(value: float | None, what: str) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0 or value > 1000):
        raise InvalidRequest(f"{what} must be a positive number up to 1000, got {value}")


def _check_non_negative(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise InvalidRequest(f"{what} must be zero or more, got {value}")


class Limits(Message, frozen=True):
    """Nova-placement style unit rules for one resource of one host."""

    resource: Token
    min_unit: Count | None = None
    max_unit: Count | None = None
    step_size: Count | None = None

    def __post_init__(self) -> None:
        if self.resource not in RESOURCE_NAMES:
            raise InvalidRequest(f"unknown resource {self.resource!r}; one of {', '.join(RESOURCE_NAMES)}")
        for name in ("min_unit", "max_unit", "step_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidRequest(f"{self.resource} {name} must be at least 1, got {value}")
        if self.min_unit is not None and self.max_unit is not None and self.max_unit < self.min_unit:
            raise InvalidRequest(
                f"{self.resource}: max_unit {self.max_unit} is below min_unit {self.min_unit}"
            )


class HostSet(Message, frozen=True):
    """``api.host.set``: operator overrides for one host; None leaves a setting as it is."""

    host: Name
    cpu_ratio: float | None = None
    ram_ratio: float | None = None
    disk_ratio: float | None = None
    reserved_memory_mib: Int64 | None = None
    reserved_cpus: Int64 | None = None
    reserved_disk_gib: Int64 | None = None
    max_vms: Int64 | None = None
    group: Name | None = None
    limits: Annotated[tuple[Limits, ...], Meta(max_length=MAX_ITEMS)] = ()
    reset: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()

    def __post_init__(self) -> None:
        check_name(self.host, "host")
        for name in RATIO_SETTINGS:
            _check_ratio(getattr(self, name), name.replace("_", " "))
        for name in (*RESERVE_SETTINGS, "max_vms"):
            _check_non_negative(getattr(self, name), name.replace("_", " "))
        if self.group is not None:
            check_name(self.group, "host group")
        unknown = [r for r in self.reset if r not in (*HOST_SETTINGS, "limits")]
        if unknown:
            raise InvalidRequest(
                f"cannot reset {', '.join(unknown)}; resettable: {', '.join(HOST_SETTINGS)}, limits"
            )


class HostSwitch(Message, frozen=True):
    """``api.host.state``: enable/disable a host or put it in or out of maintenance."""

    host: Name
    enabled: bool | None = None
    maintenance: bool | None = None
    reason: Text = ""

    def __post_init__(self) -> None:
        check_name(self.host, "host")


class CapacityRequest(Message, frozen=True):
    host: Name | None = None


class ResourceCapacity(ResourceView, frozen=True):
    """One resource of one host: the inventory, what is claimed (the fields of
    :class:`~common.messages.api.ResourceView`), its unit rules and what the host reports."""

    min_unit: int
    max_unit: int
    step_size: int
    #: what running domains on the host use per its last report (None: not measurable)
    reported: int | None = None
    #: where the ratio/reserved came from: host, group:<name> or fleet
    source: str = "fleet"


class HostCapacity(Message, frozen=True):
    host: str
    status: HostStatus
    group: str | None
    resources: tuple[ResourceCapacity, ...]
    #: differences between what the controller claimed and what the agent reports
    drift: tuple[str, ...] = ()


class CapacityReport(Message, frozen=True):
    hosts: tuple[HostCapacity, ...]


class HostGroupSet(Message, frozen=True):
    """``api.hostgroup.set``: create or update a host group's defaults."""

    name: Name
    cpu_ratio: float | None = None
    ram_ratio: float | None = None
    disk_ratio: float | None = None
    reserved_memory_mib: Int64 | None = None
    reserved_cpus: Int64 | None = None
    reserved_disk_gib: Int64 | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "host group")
        for name in RATIO_SETTINGS:
            _check_ratio(getattr(self, name), name.replace("_", " "))
        for name in RESERVE_SETTINGS:
            _check_non_negative(getattr(self, name), name.replace("_", " "))


class HostGroupView(Message, frozen=True):
    name: str
    cpu_ratio: float | None
    ram_ratio: float | None
    disk_ratio: float | None
    reserved_memory_mib: int | None
    reserved_cpus: int | None
    reserved_disk_gib: int | None
    hosts: tuple[str, ...]


class HostGroupList(Message, frozen=True):
    groups: tuple[HostGroupView, ...]


class ServerGroupCreate(Message, frozen=True):
    """``api.group.create``: an (anti-)affinity group of VMs."""

    name: Name
    policy: Token
    max_per_host: Count = 1

    def __post_init__(self) -> None:
        check_name(self.name, "server group")
        if self.policy not in GROUP_POLICIES:
            raise InvalidRequest(f"policy must be one of {', '.join(GROUP_POLICIES)}, got {self.policy!r}")
        if self.max_per_host < 1:
            raise InvalidRequest(f"max per host must be at least 1, got {self.max_per_host}")


class ServerGroupRef(Message, frozen=True):
    name: Name

    def __post_init__(self) -> None:
        check_name(self.name, "server group")


class ServerGroupView(Message, frozen=True):
    name: str
    policy: str
    max_per_host: int
    members: dict[str, int]  # host -> VMs of the group there


class ServerGroupList(Message, frozen=True):
    groups: tuple[ServerGroupView, ...]


class Done(Message, frozen=True):
    message: str = ""


_F = Timeout.FAST
_READ, _OPERATE, _ADMIN = Role.READER, Role.OPERATOR, Role.ADMIN

API_HOST_SET = api_call(
    API, "api.host.set", HostSet, Done, _F, "virtfleet host set", role=_ADMIN, idempotent=True
)
API_HOST_STATE = api_call(
    API,
    "api.host.state",
    HostSwitch,
    Done,
    _F,
    "virtfleet host enable|disable|maintenance",
    role=_ADMIN,
    idempotent=True,
)
API_HOST_CAPACITY = query(
    API, "api.host.capacity", CapacityRequest, CapacityReport, "virtfleet host capacity"
)
API_HOSTGROUP_SET = api_call(
    API, "api.hostgroup.set", HostGroupSet, Done, _F, "virtfleet hostgroup set", role=_ADMIN, idempotent=True
)
API_HOSTGROUP_LIST = query(
    API, "api.hostgroup.list", CapacityRequest, HostGroupList, "virtfleet hostgroup list"
)
API_GROUP_CREATE = api_call(
    API, "api.group.create", ServerGroupCreate, ServerGroupView, _F, "virtfleet group create", role=_OPERATE
)
API_GROUP_DELETE = api_call(
    API,
    "api.group.delete",
    ServerGroupRef,
    Done,
    _F,
    "virtfleet group delete",
    role=_OPERATE,
    idempotent=True,
)
API_GROUP_LIST = query(API, "api.group.list", CapacityRequest, ServerGroupList, "virtfleet group list")
