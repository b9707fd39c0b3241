"""Hard rules: each filter is a small pure function ``(host, ctx) -> HostRejection | None``.

Every host is run through every filter that applies to the request, so an explanation
names each rule a host fails, not just the first. Which filters apply is decided once
per request in :func:`build_context` (a request without networks skips the network
filter), which is also what keeps a 10,000-host pass cheap.

Resource checks follow OpenStack placement exactly (see :func:`check_resource`). The
N+1 rule is fleet-wide and lives in :class:`Headroom`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controller.scheduler.model import (
    FleetSnapshot,
    GroupPolicy,
    HostRejection,
    HostState,
    PlacementRequest,
    ResourceClass,
    Rule,
    ServerGroup,
    format_amount,
    format_ratio,
    format_timestamp,
)

__all__ = [
    "HW_ACCELERATED",
    "N_PLUS_ONE_RESOURCES",
    "FilterContext",
    "Headroom",
    "HostFilter",
    "affinity",
    "anti_affinity",
    "bridges",
    "build_context",
    "check_resource",
    "cpuset",
    "dedicated_cpus",
    "excluded",
    "forced_host",
    "fullness_key",
    "host_enabled",
    "host_reachable",
    "host_rejections",
    "host_up",
    "hw_accelerated",
    "hw_virt",
    "make_context",
    "max_vms",
    "networks",
    "not_in_maintenance",
    "passes",
    "resource_rule",
]

#: Hypervisor types that run guests with hardware acceleration; "qemu" is TCG emulation
#: and "test" is libvirt's mock driver, neither of which can serve a VM needing VT-x/AMD-V.
HW_ACCELERATED: frozenset[str] = frozenset({"kvm", "xen"})

#: Resources the N+1 rule checks (the ones a failed host's VMs need elsewhere).
N_PLUS_ONE_RESOURCES: tuple[ResourceClass, ...] = (
    ResourceClass.MEMORY_MIB,
    ResourceClass.VCPU,
    ResourceClass.DISK_GIB,
)

_MEMORY_INDEX = N_PLUS_ONE_RESOURCES.index(ResourceClass.MEMORY_MIB)

_HUGEPAGES = frozenset({ResourceClass.HUGEPAGES_2M, ResourceClass.HUGEPAGES_1G})


@dataclass(frozen=True, slots=True)
class FilterContext:
    """Per-request facts shared by all filters, computed once by :func:`build_context`.

    ``filters`` are the host filters that apply to this request; ``resources`` the
    (resource, amount) pairs checked with :func:`check_resource` (PCPU is left to the
    dedicated CPU filter, which also looks at the concrete free CPUs).
    ``request_filters`` is the subset of ``filters`` that depends on the request (the
    others only read host state that :attr:`HostState.accepting` summarises).
    """

    request: PlacementRequest
    group: ServerGroup | None
    now: float | None
    filters: tuple[HostFilter, ...]
    request_filters: tuple[HostFilter, ...]
    resources: tuple[tuple[ResourceClass, int], ...]


HostFilter = Callable[[HostState, FilterContext], HostRejection | None]


def resource_rule(resource: ResourceClass) -> Rule:
    """The rule identifier used when ``resource`` is what a host lacks."""
    if resource is ResourceClass.PCPU:
        return Rule.DEDICATED_CPUS
    if resource in _HUGEPAGES:
        return Rule.HUGEPAGES
    return Rule.CAPACITY


def check_resource(host: HostState, resource: ResourceClass, amount: int) -> HostRejection | None:
    """Placement's claim rule for ``amount`` (> 0) of ``resource`` on ``host``.

    Refused when the host has no inventory of it, ``amount < min_unit``, ``amount %
    step_size != 0``, ``amount > max_unit`` (when one is set), or ``used + amount >
    capacity``. A shape problem (unit/step) is reported before a shortage because no
    amount of free space would fix it.
    """
    inventory = host.inventories.get(resource)
    if inventory is not None:
        free = host.free[resource]
        if (
            amount <= free
            and amount >= inventory.min_unit
            and amount % inventory.step_size == 0
            and (inventory.max_unit is None or amount <= inventory.max_unit)
        ):
            return None  # the common case, kept to one branch for the 10k-host loop
    return _resource_rejection(host, resource, amount)


def _resource_rejection(host: HostState, resource: ResourceClass, amount: int) -> HostRejection:
    rule = resource_rule(resource)
    label, wanted = resource.label, format_amount(resource, amount)
    inventory = host.inventories.get(resource)
    if inventory is None:
        return HostRejection(
            host_id=host.host_id,
            rule=rule,
            message=f"no {label} inventory (requested {wanted})",
            resource=resource,
            requested=amount,
            free=0,
            short_by=amount,
        )
    free = host.free[resource]
    short: int | None = None
    if amount < inventory.min_unit:
        message = f"{label} request {wanted} is below min_unit {inventory.min_unit}"
    elif amount % inventory.step_size:
        message = f"{label} request {wanted} is not a multiple of step_size {inventory.step_size}"
    elif inventory.max_unit is not None and amount > inventory.max_unit:
        message = f"{label} request {wanted} is above max_unit {inventory.max_unit}"
    else:
        short = amount - free
        ratio = format_ratio(inventory.allocation_ratio)
        message = f"{label} short by {format_amount(resource, short)} at ratio {ratio}"
    return HostRejection(
        host_id=host.host_id,
        rule=rule,
        message=message,
        resource=resource,
        requested=amount,
        free=max(0, free),
        short_by=short,
        ratio=inventory.allocation_ratio,
    )


def host_up(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Down hosts (no recent heartbeat, decided by the caller) take nothing."""
    if host.up:
        return None
    since = host.down_since
    message = "down" if since is None else f"down since {format_timestamp(since, ctx.now)}"
    return HostRejection(host_id=host.host_id, rule=Rule.HOST_DOWN, message=message, since=since)


def host_reachable(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Degraded hosts (the agent cannot reach libvirt: libvirtd restarting) take nothing."""
    if host.hypervisor_error is None:
        return None
    return HostRejection(
        host_id=host.host_id, rule=Rule.DEGRADED, message=f"degraded: {host.hypervisor_error}"
    )


def host_enabled(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Hosts disabled by an operator take nothing."""
    if host.enabled:
        return None
    message = "disabled by an operator" + (f": {host.state_reason}" if host.state_reason else "")
    return HostRejection(host_id=host.host_id, rule=Rule.DISABLED, message=message)


def not_in_maintenance(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Hosts in maintenance are being drained; they take nothing."""
    if not host.maintenance:
        return None
    message = "in maintenance" + (f": {host.state_reason}" if host.state_reason else "")
    return HostRejection(host_id=host.host_id, rule=Rule.MAINTENANCE, message=message)


def excluded(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """A reschedule never goes back to a host where this request already failed."""
    if host.host_id not in ctx.request.exclude_hosts:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.EXCLUDED,
        message="already failed this request (reschedule)",
    )


def forced_host(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """With ``--host`` only that host is considered (and it must pass every other rule)."""
    wanted = ctx.request.force_host
    if wanted is None or host.host_id == wanted:
        return None
    return HostRejection(host_id=host.host_id, rule=Rule.FORCED_HOST, message=f"not the forced host {wanted}")


def hw_accelerated(host: HostState) -> bool:
    """The host can serve a VM that needs hardware virtualisation (see :func:`hw_virt`)."""
    kind = host.hypervisor_type
    return host.has_hw_virt and (kind in HW_ACCELERATED or kind.lower() in HW_ACCELERATED)


def hw_virt(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """VMs needing hardware virtualisation need VT-x/AMD-V and an accelerated hypervisor."""
    if not ctx.request.needs_hw_virt or hw_accelerated(host):
        return None
    why = "VT-x/AMD-V absent" if not host.has_hw_virt else f"hypervisor {host.hypervisor_type}"
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.HW_VIRT,
        message=f"no hardware virtualisation ({why})",
    )


def _missing(
    host: HostState, rule: Rule, noun: str, wanted: frozenset[str], present: frozenset[str]
) -> HostRejection | None:
    if wanted <= present:
        return None
    absent = wanted - present
    names = tuple(sorted(absent))
    plural = "s" if len(names) > 1 else ""
    return HostRejection(
        host_id=host.host_id,
        rule=rule,
        message=f"missing {noun}{plural} {','.join(names)}",
        missing=names,
    )


def networks(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Every libvirt network the VM attaches to must be defined on the host."""
    if ctx.request.networks <= host.networks:
        return None  # checked here too: skipping the helper call matters at 10k hosts
    return _missing(host, Rule.NETWORK, "network", ctx.request.networks, host.networks)


def bridges(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Every bridge the VM attaches to must exist on the host."""
    if ctx.request.bridges <= host.bridges:
        return None
    return _missing(host, Rule.BRIDGE, "bridge", ctx.request.bridges, host.bridges)


def max_vms(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """A host with a VM limit that is reached takes no more VMs."""
    limit = host.max_vms
    if limit is None or host.vm_count < limit:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.MAX_VMS,
        message=f"already runs {host.vm_count} VMs (max {limit})",
        requested=1,
        free=0,
        short_by=host.vm_count + 1 - limit,
    )


def _host_list(hosts: Iterable[str], shown: int = 3) -> str:
    ordered = sorted(hosts)
    text = ",".join(ordered[:shown])
    return text if len(ordered) <= shown else f"{text} (+{len(ordered) - shown} more)"


def affinity(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Hard affinity: once the group has VMs, new ones go only where it already runs."""
    group = ctx.group
    if group is None or group.policy is not GroupPolicy.AFFINITY or not group.members:
        return None
    if host.host_id in group.members:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.AFFINITY,
        message=f"server group {group.name} (affinity) runs on {_host_list(group.members)} only",
    )


def anti_affinity(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Hard anti-affinity: at most ``max_per_host`` of the group's VMs on one host."""
    group = ctx.group
    if group is None or group.policy is not GroupPolicy.ANTI_AFFINITY:
        return None
    count = group.members.get(host.host_id, 0)
    if count < group.max_per_host:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.ANTI_AFFINITY,
        message=(
            f"server group {group.name} (anti-affinity) already has {count} VM(s) here "
            f"(max {group.max_per_host} per host)"
        ),
        requested=1,
        free=0,
        short_by=count + 1 - group.max_per_host,
    )


def dedicated_cpus(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """Pinned CPUs: the PCPU inventory must fit *and* enough concrete CPUs must be free.

    Both are checked because they can disagree (the inventory is what the host
    advertises, ``free_pcpus`` what the pinning bookkeeping says is really unused).
    """
    count = ctx.request.dedicated_cpus
    if count == 0:
        return None
    rejection = check_resource(host, ResourceClass.PCPU, count)
    if rejection is not None:
        return rejection
    available = len(host.free_pcpus)
    if available >= count:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.DEDICATED_CPUS,
        message=f"only {available} free pinnable CPUs, need {count}",
        resource=ResourceClass.PCPU,
        requested=count,
        free=available,
        short_by=count - available,
    )


def cpuset(host: HostState, ctx: FilterContext) -> HostRejection | None:
    """A ``--cpuset`` names CPUs by id: the host must have the highest it names (libvirt
    refuses a domain pinned to a CPU the host does not have)."""
    highest = ctx.request.highest_cpu
    if highest is None or highest < host.cpus:
        return None
    return HostRejection(
        host_id=host.host_id,
        rule=Rule.CPUSET,
        message=(
            f"the cpuset names CPU {highest}, the host has CPUs 0-{host.cpus - 1}"
            if host.cpus
            else f"the cpuset names CPU {highest}, the host has not reported its CPUs"
        ),
        requested=highest + 1,
        free=host.cpus,
        short_by=highest + 1 - host.cpus,
    )


def build_context(snapshot: FleetSnapshot, request: PlacementRequest) -> FilterContext:
    """Resolve the request's group and select the filters that can reject anything.

    Raises :class:`~controller.scheduler.model.UnknownServerGroupError` when the request
    names a group the snapshot does not have.
    """
    group = None if request.group is None else snapshot.group(request.group)
    return make_context(request, group, snapshot.now)


def make_context(request: PlacementRequest, group: ServerGroup | None, now: float | None) -> FilterContext:
    """:func:`build_context` for a caller that resolved the group itself (no snapshot)."""
    optional: tuple[tuple[bool, HostFilter], ...] = (
        (bool(request.exclude_hosts), excluded),
        (request.force_host is not None, forced_host),
        (request.needs_hw_virt, hw_virt),
        (bool(request.networks), networks),
        (bool(request.bridges), bridges),
        (group is not None and group.policy is GroupPolicy.AFFINITY, affinity),
        (group is not None and group.policy is GroupPolicy.ANTI_AFFINITY, anti_affinity),
        (request.dedicated_cpus > 0, dedicated_cpus),
        (request.highest_cpu is not None, cpuset),
    )
    per_request = tuple(check for wanted, check in optional if wanted)
    resources = tuple(
        (rc, amount) for rc, amount in sorted(request.resources.items()) if rc is not ResourceClass.PCPU
    )
    return FilterContext(
        request=request,
        group=group,
        now=now,
        filters=(host_up, host_reachable, host_enabled, not_in_maintenance, max_vms, *per_request),
        request_filters=per_request,
        resources=resources,
    )


def host_rejections(host: HostState, ctx: FilterContext) -> list[HostRejection]:
    """Every reason ``host`` cannot take the request (empty: it passes every host rule)."""
    found: list[HostRejection] = []
    for check in ctx.filters:
        rejection = check(host, ctx)
        if rejection is not None:
            found.append(rejection)
    for resource, amount in ctx.resources:
        rejection = check_resource(host, resource, amount)
        if rejection is not None:
            found.append(rejection)
    return found


def passes(host: HostState, ctx: FilterContext) -> bool:
    """``not host_rejections(host, ctx)``, without building any rejection.

    This runs for every host on every full walk, so the host-only rules are read from
    ``host.accepting``, resources are compared with ``host.free`` directly unless the host
    has unit constraints, and it stops at the first failure (a property test holds it to
    the full evaluation).
    """
    if not host.accepting:
        return False
    free = host.free
    for resource, amount in ctx.resources:
        # Missing inventory reads as -1, which every (positive) amount exceeds.
        if free.get(resource, -1) < amount:
            return False
    if not host.plain_units and any(
        check_resource(host, rc, amount) is not None for rc, amount in ctx.resources
    ):
        return False
    # A loop, not all(): no generator object per host on the 10k-host walk.
    for check in ctx.request_filters:  # noqa: SIM110
        if check(host, ctx) is not None:
            return False
    return True


def _schedulable(host: HostState) -> bool:
    return host.up and host.enabled and not host.maintenance


@dataclass(frozen=True, slots=True)
class Headroom:
    """Fleet totals for the N+1 rule, computed once per request with :meth:`of`.

    The rule (after Ganeti): placing the VM on H is refused when the fleet could then
    not absorb the loss of its fullest host F, the up host with the most memory in use
    after the placement (ties: lowest host id). For each of memory, vCPU and disk it
    requires ``used(F) <= sum of free on the other schedulable hosts``.

    This is an aggregate approximation: it ignores fragmentation (a VM cannot be split
    across hosts), the other rules on the absorbing hosts (networks, groups, max VMs),
    dedicated CPUs and huge pages, and it checks only the memory-fullest host rather than
    the loss of every host. It is therefore optimistic: passing it does not prove that
    every evacuation will fit, failing it proves one cannot.
    """

    amounts: tuple[int, ...]  # the request, per N_PLUS_ONE_RESOURCES
    free_total: tuple[int, ...]  # per N_PLUS_ONE_RESOURCES, schedulable hosts, free clamped at 0
    fullest: tuple[HostState, ...]  # the two up hosts with the most memory used, fullest first
    baseline: tuple[_Shortfall, ...]  # shortfalls while fullest[0] stays the host to lose

    @classmethod
    def of(cls, hosts: Iterable[HostState], request: PlacementRequest) -> Headroom:
        """Sum free resources over schedulable hosts, find the two fullest up hosts and
        precompute the verdict shared by every host that does not become the fullest."""
        memory, vcpu, disk = N_PLUS_ONE_RESOURCES
        # Unrolled over the three resources: this loop visits every host of the fleet.
        free_memory = free_vcpu = free_disk = 0
        first: HostState | None = None
        second: HostState | None = None
        second_memory = -1
        for host in hosts:
            if not host.up:
                continue
            if host.enabled and not host.maintenance:
                free = host.free
                value = free.get(memory, 0)
                free_memory += value if value > 0 else 0
                value = free.get(vcpu, 0)
                free_vcpu += value if value > 0 else 0
                value = free.get(disk, 0)
                free_disk += value if value > 0 else 0
            used_memory = host.used.get(memory, 0)
            if used_memory < second_memory:
                continue  # cannot be one of the two fullest
            key = fullness_key(host)
            if first is None or key < fullness_key(first):
                first, second = host, first
            elif second is None or key < fullness_key(second):
                second = host
            if second is not None:
                second_memory = second.used.get(memory, 0)
        fullest = tuple(h for h in (first, second) if h is not None)
        return cls.from_totals((free_memory, free_vcpu, free_disk), fullest, request)

    @classmethod
    def from_totals(
        cls, free_total: tuple[int, ...], fullest: tuple[HostState, ...], request: PlacementRequest
    ) -> Headroom:
        """The same as :meth:`of` from totals kept elsewhere (e.g. maintained by an index):
        ``free_total`` per :data:`N_PLUS_ONE_RESOURCES` over schedulable hosts (free
        clamped at 0) and the (up to) two up hosts with the most memory used, fullest
        first (ties: lowest host id)."""
        amounts = tuple(request.resources.get(resource, 0) for resource in N_PLUS_ONE_RESOURCES)
        baseline = () if not fullest else _shortfalls(fullest[0], False, amounts, free_total)
        return cls(amounts=amounts, free_total=free_total, fullest=fullest, baseline=baseline)

    def check(self, host: HostState) -> list[HostRejection]:
        """Rejections (one per short resource) if placing the request on ``host`` breaks N+1.

        ``host`` must have passed the host rules (so it is schedulable and the VM fits).
        """
        after_key = (
            -(host.used.get(ResourceClass.MEMORY_MIB, 0) + self.amounts[_MEMORY_INDEX]),
            host.host_id,
        )
        top = self.fullest[0] if self.fullest else None
        if top is not None and top.host_id != host.host_id and after_key > fullness_key(top):
            # The common case: the fleet's fullest host stays the one to lose, so every
            # such host shares one precomputed verdict.
            if not self.baseline:
                return []
            victim, grows, shortfalls = top, False, self.baseline
        else:
            other = next((h for h in self.fullest if h.host_id != host.host_id), None)
            if other is None or after_key <= fullness_key(other):
                victim, grows = host, True  # the VM makes this host the one to lose
            else:
                victim, grows = other, False
            shortfalls = _shortfalls(victim, grows, self.amounts, self.free_total)
        who = "this host" if grows else victim.host_id
        return [
            HostRejection(
                host_id=host.host_id,
                rule=Rule.N_PLUS_ONE,
                message=(
                    f"n+1: losing {who} ({format_amount(resource, lost)} {resource.label} in use) "
                    f"would leave {resource.label} short by {format_amount(resource, lost - others_free)} "
                    "on the other hosts"
                ),
                resource=resource,
                requested=amount,
                free=others_free,
                short_by=lost - others_free,
            )
            for resource, lost, others_free, amount in shortfalls
        ]


_Shortfall = tuple[ResourceClass, int, int, int]  # resource, lost, free elsewhere, requested


def _shortfalls(
    victim: HostState, grows: bool, amounts: tuple[int, ...], free_total: tuple[int, ...]
) -> tuple[_Shortfall, ...]:
    """Resources for which losing ``victim`` (after the placement) cannot be absorbed.

    ``grows``: the VM lands on the victim itself. The placement host's free space is in
    ``free_total`` and shrinks by the VM either way; the victim's own free space is not
    available to absorb its VMs.
    """
    found: list[_Shortfall] = []
    schedulable = _schedulable(victim)
    for index, resource in enumerate(N_PLUS_ONE_RESOURCES):
        amount = amounts[index]
        lost = victim.used.get(resource, 0) + (amount if grows else 0)
        others_free = free_total[index] - amount
        if schedulable:
            others_free -= max(0, victim.free.get(resource, 0)) - (amount if grows else 0)
        others_free = max(0, others_free)
        if lost > others_free:
            found.append((resource, lost, others_free, amount))
    return tuple(found)


def fullness_key(host: HostState) -> tuple[int, str]:
    """Order of "fullest" for N+1: most memory used first, then lowest host id."""
    return (-host.used.get(ResourceClass.MEMORY_MIB, 0), host.host_id)
