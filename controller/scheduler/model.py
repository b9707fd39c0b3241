"""Immutable inputs and outputs of the scheduler.

Everything here is a frozen, slotted dataclass holding tuples, frozensets or
:class:`FrozenMap` values, so a snapshot can be shared, hashed and compared freely and
the scheduler cannot change what the caller handed in. Fields typed ``Mapping`` accept
any mapping and are frozen into a :class:`FrozenMap` on construction.

Capacity follows OpenStack placement: ``capacity = int((total - reserved) * ratio)``
and a claim of ``amount`` fits when ``used + amount <= capacity``, ``min_unit <= amount
<= max_unit`` and ``amount % step_size == 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import NoReturn, TypeVar

__all__ = [
    "NON_OVERCOMMITTABLE",
    "Candidate",
    "FleetSnapshot",
    "FrozenMap",
    "GroupPolicy",
    "HostRejection",
    "HostState",
    "Inventory",
    "Placement",
    "PlacementPolicy",
    "PlacementRequest",
    "Refusal",
    "ResourceClass",
    "Rule",
    "ServerGroup",
    "Strategy",
    "UnknownServerGroupError",
    "format_amount",
    "format_ratio",
    "format_timestamp",
]

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(dict[K, V]):
    """A hashable, read-only dict.

    It subclasses ``dict`` (rather than wrapping one) so lookups in the scheduler's hot
    loop run at C speed; every mutating method raises ``TypeError``.
    """

    __slots__ = ("_hash",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = (), /) -> None:
        super().__init__(items)
        self._hash: int | None = None

    def __hash__(self) -> int:  # type: ignore[override]  # dict declares __hash__ = None
        cached = self._hash
        if cached is None:
            cached = hash(frozenset(self.items()))
            self._hash = cached
        return cached

    def __repr__(self) -> str:
        return f"FrozenMap({dict.__repr__(self)})"

    def __reduce__(self) -> tuple[type[FrozenMap[K, V]], tuple[dict[K, V]]]:
        # copy/pickle would otherwise rebuild the dict through the blocked __setitem__.
        return (type(self), (dict(self),))

    def _immutable(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("FrozenMap is immutable")

    __setitem__ = _immutable
    __delitem__ = _immutable
    __ior__ = _immutable
    clear = _immutable
    pop = _immutable
    popitem = _immutable
    setdefault = _immutable
    update = _immutable


def _freeze(value: Mapping[K, V]) -> FrozenMap[K, V]:
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


class ResourceClass(StrEnum):
    """Kinds of countable resources, named as in OpenStack placement."""

    VCPU = "VCPU"
    MEMORY_MIB = "MEMORY_MIB"
    DISK_GIB = "DISK_GIB"
    PCPU = "PCPU"  # dedicated physical CPUs (pinned, never shared)
    HUGEPAGES_2M = "HUGEPAGES_2M"  # counted in pages
    HUGEPAGES_1G = "HUGEPAGES_1G"  # counted in pages

    @property
    def label(self) -> str:
        """Human name used in explanations, e.g. ``"memory"``."""
        return _LABELS[self][0]

    @property
    def unit(self) -> str:
        """Unit used in explanations, e.g. ``"MiB"``."""
        return _LABELS[self][1]


_LABELS: dict[ResourceClass, tuple[str, str]] = {
    ResourceClass.VCPU: ("vcpu", "vCPU"),
    ResourceClass.MEMORY_MIB: ("memory", "MiB"),
    ResourceClass.DISK_GIB: ("disk", "GiB"),
    ResourceClass.PCPU: ("dedicated cpu", "pCPU"),
    ResourceClass.HUGEPAGES_2M: ("2M hugepages", "pages"),
    ResourceClass.HUGEPAGES_1G: ("1G hugepages", "pages"),
}

#: Resources that exist physically per unit: a dedicated CPU or a reserved huge page
#: cannot be handed to two VMs, so their allocation ratio is always 1.0.
NON_OVERCOMMITTABLE: frozenset[ResourceClass] = frozenset(
    {ResourceClass.PCPU, ResourceClass.HUGEPAGES_2M, ResourceClass.HUGEPAGES_1G}
)


def format_amount(resource: ResourceClass, amount: int) -> str:
    """``format_amount(MEMORY_MIB, 2048)`` -> ``"2048 MiB"``."""
    return f"{amount} {resource.unit}"


def format_ratio(ratio: float) -> str:
    """Render a ratio the way operators write it: ``1.0``, ``1.5``, ``16.0``."""
    text = f"{ratio:.4g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def format_timestamp(when: float, now: float | None) -> str:
    """``12:04:10 UTC``, with the date in front when it is not ``now``'s day (or unknown)."""
    moment = datetime.fromtimestamp(when, tz=UTC)
    same_day = now is not None and datetime.fromtimestamp(now, tz=UTC).date() == moment.date()
    return moment.strftime("%H:%M:%S UTC" if same_day else "%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True)
class Inventory:
    """How much of one resource a host offers.

    ``max_unit`` ``None`` means "up to the capacity". ``capacity`` is computed once at
    construction (the scheduler reads it for every host on every request).
    Use :meth:`for_class` to build one from operator settings: it forces the ratio of
    :data:`NON_OVERCOMMITTABLE` resources to 1.0.
    """

    total: int
    reserved: int = 0
    allocation_ratio: float = 1.0
    min_unit: int = 1
    max_unit: int | None = None
    step_size: int = 1
    capacity: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.total < 0 or self.reserved < 0:
            raise ValueError(f"inventory total/reserved must be >= 0: {self.total}/{self.reserved}")
        if not math.isfinite(self.allocation_ratio) or self.allocation_ratio <= 0:
            raise ValueError(f"allocation ratio must be a positive number: {self.allocation_ratio}")
        if self.min_unit < 1 or self.step_size < 1:
            raise ValueError(f"min_unit and step_size must be >= 1: {self.min_unit}/{self.step_size}")
        if self.max_unit is not None and self.max_unit < self.min_unit:
            raise ValueError(f"max_unit {self.max_unit} is below min_unit {self.min_unit}")
        # Floor, as placement does; reserved above total leaves nothing rather than a
        # negative capacity that would make every "short by" figure absurd.
        capacity = max(0, int((self.total - self.reserved) * self.allocation_ratio))
        object.__setattr__(self, "capacity", capacity)

    @property
    def effective_max_unit(self) -> int:
        """The largest single claim allowed: ``max_unit`` or, when unset, the capacity."""
        return self.capacity if self.max_unit is None else self.max_unit

    @classmethod
    def for_class(
        cls,
        resource: ResourceClass,
        total: int,
        *,
        reserved: int = 0,
        allocation_ratio: float = 1.0,
        min_unit: int = 1,
        max_unit: int | None = None,
        step_size: int = 1,
    ) -> Inventory:
        """Build an inventory for ``resource``, clamping the ratio of PCPU and huge pages.

        Clamping (rather than raising) is deliberate here: operators set one CPU ratio
        for a host and the caller passes it to every CPU-ish class; dedicated CPUs must
        still never be overcommitted. :class:`HostState` *raises* if it receives such an
        inventory built by hand with another ratio.
        """
        ratio = 1.0 if resource in NON_OVERCOMMITTABLE else allocation_ratio
        return cls(total, reserved, ratio, min_unit, max_unit, step_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostState:
    """One hypervisor as the scheduler sees it, read from the database by the caller.

    ``up`` is decided by the caller from heartbeats; ``down_since`` (epoch seconds) is
    only used to explain. Derived on construction: ``free`` = ``capacity - used`` per
    inventory (negative when a ratio was lowered under existing allocations),
    ``accepting`` (up, not degraded, enabled, not in maintenance, below ``max_vms``) and
    ``plain_units`` (no inventory has a min_unit, step_size or max_unit constraint).
    ``generation`` is carried through untouched for the caller's optimistic claim.
    """

    host_id: str
    inventories: Mapping[ResourceClass, Inventory]
    used: Mapping[ResourceClass, int] = field(default_factory=FrozenMap)
    enabled: bool = True
    maintenance: bool = False
    #: the operator's reason for disabling it or putting it in maintenance (only explains)
    state_reason: str | None = None
    #: why its agent cannot reach libvirt (degraded: takes nothing); None when it can
    hypervisor_error: str | None = None
    up: bool = True
    down_since: float | None = None
    has_hw_virt: bool = True
    hypervisor_type: str = "kvm"
    networks: frozenset[str] = frozenset()
    bridges: frozenset[str] = frozenset()
    vm_count: int = 0
    max_vms: int | None = None
    groups: frozenset[str] = frozenset()
    generation: int = 0
    free_pcpus: frozenset[int] = frozenset()
    pcpu_numa: Mapping[int, int] = field(default_factory=FrozenMap)
    #: logical CPUs, numbered 0..cpus-1 (what a ``--cpuset`` names); 0 when not reported yet
    cpus: int = 0
    free: Mapping[ResourceClass, int] = field(init=False, compare=False, repr=False)
    accepting: bool = field(init=False, compare=False, repr=False)
    plain_units: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        inventories = _freeze(self.inventories)
        used = _freeze(self.used)
        for resource, inventory in inventories.items():
            if resource in NON_OVERCOMMITTABLE and inventory.allocation_ratio != 1.0:
                raise ValueError(
                    f"host {self.host_id}: {resource} cannot be overcommitted "
                    f"(ratio {inventory.allocation_ratio}); use Inventory.for_class"
                )
        for resource, amount in used.items():
            if amount < 0:
                raise ValueError(f"host {self.host_id}: negative usage {amount} of {resource}")
        object.__setattr__(self, "inventories", inventories)
        object.__setattr__(self, "used", used)
        object.__setattr__(self, "pcpu_numa", _freeze(self.pcpu_numa))
        object.__setattr__(
            self,
            "free",
            FrozenMap((rc, inv.capacity - used.get(rc, 0)) for rc, inv in inventories.items()),
        )
        # Derived once here so the scheduler's per-host fast path is a few attribute reads:
        # a host that takes new VMs at all, and one whose inventories need only "fits?".
        accepting = (
            self.up
            and self.hypervisor_error is None
            and self.enabled
            and not self.maintenance
            and (self.max_vms is None or self.vm_count < self.max_vms)
        )
        plain = all(
            inv.min_unit == 1 and inv.step_size == 1 and inv.max_unit is None for inv in inventories.values()
        )
        object.__setattr__(self, "accepting", accepting)
        object.__setattr__(self, "plain_units", plain)


class GroupPolicy(StrEnum):
    """Server group policies; the soft ones only weigh, the hard ones filter."""

    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"
    SOFT_AFFINITY = "soft-affinity"
    SOFT_ANTI_AFFINITY = "soft-anti-affinity"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerGroup:
    """An (anti-)affinity group and where its VMs run now (``members``: host -> count).

    ``max_per_host`` applies to (soft-)anti-affinity: a host may hold up to that many of
    the group's VMs before a hard anti-affinity group refuses it.
    """

    name: str
    policy: GroupPolicy
    max_per_host: int = 1
    members: Mapping[str, int] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        if self.max_per_host < 1:
            raise ValueError(f"group {self.name}: max_per_host must be >= 1")
        # Zero counts are dropped so "the group has members" means a VM exists somewhere.
        object.__setattr__(self, "members", FrozenMap((h, n) for h, n in self.members.items() if n > 0))


class UnknownServerGroupError(ValueError):
    """The request names a server group that is not in the snapshot."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSnapshot:
    """Everything the scheduler may look at; ``now`` (epoch seconds) is the caller's clock."""

    hosts: tuple[HostState, ...]
    server_groups: tuple[ServerGroup, ...] = ()
    now: float | None = None

    def group(self, name: str) -> ServerGroup:
        """The server group called ``name``; :class:`UnknownServerGroupError` if absent."""
        for group in self.server_groups:
            if group.name == name:
                return group
        raise UnknownServerGroupError(f"server group {name!r} is not in the snapshot")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRequest:
    """What one VM needs.

    ``dedicated_cpus`` and ``resources[PCPU]`` are the same quantity: give either one and
    the other is filled in; giving both with different values is a ``ValueError``.
    ``force_host`` (the operator's ``--host``) limits the choice to that host, which must
    still pass every hard rule. ``exclude_hosts`` lists hosts where this request already
    failed (reschedule).
    """

    vm_name: str
    resources: Mapping[ResourceClass, int]
    needs_hw_virt: bool = False
    networks: frozenset[str] = frozenset()
    bridges: frozenset[str] = frozenset()
    group: str | None = None
    force_host: str | None = None
    exclude_hosts: frozenset[str] = frozenset()
    dedicated_cpus: int = 0
    prefer_numa_local: bool = True
    #: the highest CPU id a ``--cpuset`` names: only a host that has that CPU can take the VM
    highest_cpu: int | None = None

    def __post_init__(self) -> None:
        resources = dict(self.resources)
        for resource, amount in resources.items():
            if amount < 0:
                raise ValueError(f"{self.vm_name}: negative amount {amount} of {resource}")
        pcpu = resources.get(ResourceClass.PCPU, 0)
        if self.dedicated_cpus < 0:
            raise ValueError(f"{self.vm_name}: negative dedicated_cpus {self.dedicated_cpus}")
        if self.dedicated_cpus and pcpu and pcpu != self.dedicated_cpus:
            raise ValueError(
                f"{self.vm_name}: dedicated_cpus={self.dedicated_cpus} but PCPU={pcpu} in resources"
            )
        count = self.dedicated_cpus or pcpu
        if count:
            resources[ResourceClass.PCPU] = count
        # Zero amounts are dropped: asking for none of a resource is not asking at all.
        object.__setattr__(self, "resources", FrozenMap((rc, n) for rc, n in resources.items() if n > 0))
        object.__setattr__(self, "dedicated_cpus", count)


class Strategy(StrEnum):
    """Spread VMs over the fleet (most free first) or pack them (least free first)."""

    SPREAD = "spread"
    PACK = "pack"


def _default_multipliers() -> FrozenMap[ResourceClass, float]:
    return FrozenMap({ResourceClass.VCPU: 1.0, ResourceClass.MEMORY_MIB: 1.0, ResourceClass.DISK_GIB: 1.0})


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPolicy:
    """How to choose among hosts that pass every rule.

    ``multipliers`` weigh each resource's normalised free amount (0 or absent: ignored).
    ``group_multiplier`` weighs soft (anti-)affinity; its default of 10 outweighs the
    three resource weighers together (at most 3.0) so a soft policy is honoured whenever
    it can be, and only bends when no host satisfies it.
    ``max_ranked`` bounds the scored candidates kept for display (``None``: all of them;
    building a breakdown for 10,000 hosts costs more than choosing one).
    ``choose_among`` > 1 picks the host at random among the best ``choose_among`` (the
    rest of the ranking, in order, gives the alternates) so that several controllers
    deciding at the same time on the same fleet rarely pick the same host and lose the
    claim race to each other. The default of 1 always takes the best host, as before.
    """

    strategy: Strategy = Strategy.SPREAD
    multipliers: Mapping[ResourceClass, float] = field(default_factory=_default_multipliers)
    group_multiplier: float = 10.0
    n_plus_one: bool = False
    max_alternates: int = 2
    max_ranked: int | None = 10
    choose_among: int = 1

    def __post_init__(self) -> None:
        if self.choose_among < 1:
            raise ValueError(f"choose_among must be >= 1: {self.choose_among}")
        if self.max_alternates < 0:
            raise ValueError(f"max_alternates must be >= 0: {self.max_alternates}")
        if self.max_ranked is not None and self.max_ranked < 0:
            raise ValueError(f"max_ranked must be >= 0: {self.max_ranked}")
        object.__setattr__(self, "multipliers", _freeze(self.multipliers))


class Rule(StrEnum):
    """Stable identifiers of the rules that can exclude a host (used by CLI/API output)."""

    HOST_DOWN = "host_down"
    DEGRADED = "degraded"
    DISABLED = "disabled"
    MAINTENANCE = "maintenance"
    EXCLUDED = "excluded"
    FORCED_HOST = "forced_host"
    HW_VIRT = "hw_virt"
    NETWORK = "network"
    BRIDGE = "bridge"
    CAPACITY = "capacity"
    DEDICATED_CPUS = "dedicated_cpus"
    CPUSET = "cpuset"
    HUGEPAGES = "hugepages"
    MAX_VMS = "max_vms"
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti_affinity"
    N_PLUS_ONE = "n_plus_one"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRejection:
    """Why one host cannot take the VM under one rule.

    ``message`` is for people; the other fields are for programs. For resource rules
    ``requested``/``free``/``short_by`` are in the resource's unit and ``ratio`` is the
    host's allocation ratio; ``free`` never goes below 0. ``missing`` lists absent
    networks or bridges; ``since`` is when a down host was last heard of.
    """

    host_id: str
    rule: Rule
    message: str
    resource: ResourceClass | None = None
    requested: int | None = None
    free: int | None = None
    short_by: int | None = None
    ratio: float | None = None
    missing: tuple[str, ...] = ()
    since: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain data for an API reply or ``--output json`` (unset fields omitted)."""
        data: dict[str, object] = {"host": self.host_id, "rule": str(self.rule), "message": self.message}
        optional: dict[str, object | None] = {
            "resource": None if self.resource is None else str(self.resource),
            "requested": self.requested,
            "free": self.free,
            "short_by": self.short_by,
            "ratio": self.ratio,
            "missing": list(self.missing) or None,
            "since": self.since,
        }
        data.update({key: value for key, value in optional.items() if value is not None})
        return data


def _summarise(rejections: tuple[HostRejection, ...], max_hosts: int | None) -> str:
    by_host: dict[str, list[str]] = {}
    for rejection in rejections:
        by_host.setdefault(rejection.host_id, []).append(rejection.message)
    parts = [f"{host}: {', '.join(messages)}" for host, messages in by_host.items()]
    if max_hosts is not None and len(parts) > max_hosts:
        hidden = len(parts) - max_hosts
        parts = [*parts[:max_hosts], f"... and {hidden} more host{'s' if hidden != 1 else ''}"]
    return "; ".join(parts)


def _tally(rejections: tuple[HostRejection, ...]) -> dict[str, int]:
    # Ganeti-style: how many hosts failed on each rule (resource rules split per resource).
    seen: dict[str, set[str]] = {}
    for rejection in rejections:
        key = str(rejection.rule)
        if rejection.resource is not None:
            key = f"{key}:{rejection.resource.label}"
        seen.setdefault(key, set()).add(rejection.host_id)
    return {key: len(hosts) for key, hosts in sorted(seen.items())}


@dataclass(frozen=True, slots=True)
class Candidate:
    """A host that passed every rule, its total score and the per-weigher contributions."""

    host_id: str
    score: float
    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _freeze(self.weights))


@dataclass(frozen=True, slots=True)
class Placement:
    """The chosen host, alternates to try if the build fails, and the explanation.

    ``ranked`` holds the best candidates in order (the chosen host first), ``pcpus`` the
    dedicated CPUs picked on the chosen host (empty for shared-CPU VMs), ``rejections``
    every host that was filtered out and why (for ``--dry-run``). For an alternate with
    dedicated CPUs the caller picks CPUs with :func:`~controller.scheduler.cpus.pick_pcpus`.
    """

    host_id: str
    alternates: tuple[str, ...]
    ranked: tuple[Candidate, ...]
    pcpus: tuple[int, ...] = ()
    rejections: tuple[HostRejection, ...] = ()

    def summary(self, max_hosts: int | None = None) -> str:
        """The rejected hosts, rendered like :meth:`Refusal.summary`."""
        return _summarise(self.rejections, max_hosts)


@dataclass(frozen=True, slots=True)
class Refusal:
    """No host can take the VM; ``reasons`` names every host and every rule it failed."""

    reasons: tuple[HostRejection, ...]
    vm_name: str = ""

    def summary(self, max_hosts: int | None = None) -> str:
        """``"host-3: memory short by 2048 MiB at ratio 1.0; host-5: down since 12:04:10 UTC"``.

        Hosts appear in snapshot order (N+1 verdicts, judged last, after the others) with
        all their messages joined by ``", "``;
        ``max_hosts`` truncates long fleets with an ``"... and N more hosts"`` tail.
        """
        if not self.reasons:
            return "no hosts in the fleet"
        return _summarise(self.reasons, max_hosts)

    def tally(self) -> dict[str, int]:
        """Hosts failing each rule, e.g. ``{"capacity:memory": 12, "host_down": 1}``."""
        return _tally(self.reasons)

    def headline(self) -> str:
        """One line for logs and the CLI: ``"no valid host for web-1: capacity:memory 12, ..."``."""
        counts = ", ".join(f"{key} {count}" for key, count in self.tally().items())
        subject = f" for {self.vm_name}" if self.vm_name else ""
        return f"no valid host{subject}: {counts or 'empty fleet'}"
