"""``place()``: choose a host for one VM, or explain why none fits.

Pure and deterministic: the same snapshot, request and policy always give the same
answer; nothing here reads a clock, the database or the network. The caller claims the
chosen host with the snapshot's ``generation`` and, if the build fails there, tries the
alternates in order, then calls ``place()`` again with the failed hosts excluded.
"""

from __future__ import annotations

from dataclasses import replace

from controller.scheduler.cpus import pick_pcpus
from controller.scheduler.filters import (
    FilterContext,
    Headroom,
    build_context,
    check_resource,
    host_rejections,
)
from controller.scheduler.model import (
    FleetSnapshot,
    FrozenMap,
    HostRejection,
    HostState,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    Rule,
    ServerGroup,
)
from controller.scheduler.weighers import rank, score_hosts

__all__ = ["apply_claim", "apply_placement", "explain", "place"]

_DEFAULT_POLICY = PlacementPolicy()


def _filter_hosts(snapshot: FleetSnapshot, ctx: FilterContext) -> tuple[list[HostState], list[HostRejection]]:
    """Split hosts into those passing every host rule and the rejections of the others.

    This loop runs for every host on every request, so it takes a fast path that is
    equivalent to ``not host_rejections(host, ctx)`` (a property test holds it to that):
    the host-only rules are read from ``host.accepting``, resources are compared with
    ``host.free`` directly unless the host has unit constraints, and the loop stops at
    the first failure. Only a rejected host pays for the full evaluation, which collects
    every rule it fails for the explanation.
    """
    passed: list[HostState] = []
    rejected: list[HostRejection] = []
    request_filters, resources = ctx.request_filters, ctx.resources
    for host in snapshot.hosts:
        ok = host.accepting
        if ok:
            free = host.free
            for resource, amount in resources:
                # Missing inventory reads as -1, which every (positive) amount exceeds.
                if free.get(resource, -1) < amount:
                    ok = False
                    break
            if ok and not host.plain_units:
                ok = all(check_resource(host, rc, amount) is None for rc, amount in resources)
        if ok:
            for check in request_filters:
                if check(host, ctx) is not None:
                    ok = False
                    break
        if ok:
            passed.append(host)
        else:
            rejected.extend(host_rejections(host, ctx))
    return passed, rejected


def place(
    snapshot: FleetSnapshot,
    request: PlacementRequest,
    policy: PlacementPolicy = _DEFAULT_POLICY,
) -> Placement | Refusal:
    """Choose a host for ``request``, or return a :class:`Refusal` naming every host's reasons.

    Steps: every host through every applicable filter; N+1 (if the policy asks) on the
    survivors; weigh the rest; the best is chosen, the next ``max_alternates`` are the
    alternates; dedicated CPUs are picked on the chosen host. Raises
    :class:`~controller.scheduler.model.UnknownServerGroupError` for an unknown group.
    """
    ctx = build_context(snapshot, request)
    passed, rejected = _filter_hosts(snapshot, ctx)
    if request.force_host is not None and all(h.host_id != request.force_host for h in snapshot.hosts):
        rejected.append(
            HostRejection(
                host_id=request.force_host,
                rule=Rule.FORCED_HOST,
                message="forced host is not in the fleet",
            )
        )
    if policy.n_plus_one and passed:
        passed, rejected = _apply_n_plus_one(snapshot, request, passed, rejected)
    if not passed:
        return Refusal(tuple(rejected), request.vm_name)
    scores = score_hosts(passed, ctx.group, policy)
    wanted = 1 + policy.max_alternates
    shown = None if policy.max_ranked is None else max(policy.max_ranked, wanted)
    order = rank(scores, shown)
    chosen = scores.hosts[order[0]]
    pcpus: tuple[int, ...] = ()
    if request.dedicated_cpus:
        picked = pick_pcpus(
            chosen.free_pcpus, chosen.pcpu_numa, request.dedicated_cpus, request.prefer_numa_local
        )
        if picked is None:  # the dedicated CPU filter guarantees enough free CPUs
            raise AssertionError(f"{chosen.host_id} passed the dedicated CPU filter without free CPUs")
        pcpus = picked
    return Placement(
        host_id=chosen.host_id,
        alternates=tuple(scores.hosts[i].host_id for i in order[1:wanted]),
        ranked=tuple(scores.candidate(i) for i in order),
        pcpus=pcpus,
        rejections=tuple(rejected),
    )


def _apply_n_plus_one(
    snapshot: FleetSnapshot,
    request: PlacementRequest,
    passed: list[HostState],
    rejected: list[HostRejection],
) -> tuple[list[HostState], list[HostRejection]]:
    # Judged only on hosts that pass the host rules: for the others the hypothetical
    # placement does not exist and their explanation is already complete.
    headroom = Headroom.of(snapshot.hosts, request)
    kept: list[HostState] = []
    for host in passed:
        found = headroom.check(host)
        if found:
            rejected.extend(found)
        else:
            kept.append(host)
    return kept, rejected


def apply_claim(host: HostState, request: PlacementRequest, pcpus: tuple[int, ...] = ()) -> HostState:
    """``host`` after it received ``request``: usage up, ``pcpus`` taken, one more VM.

    ``generation`` is left alone (bumping it is the database's job). Capacity is *not*
    checked (that is :func:`place`'s job), but handing out a CPU that is not free, or a
    number of CPUs different from the request's, raises ``ValueError``: that would be a
    double assignment.
    """
    taken = frozenset(pcpus)
    if len(taken) != len(pcpus) or len(taken) != request.dedicated_cpus:
        raise ValueError(f"{request.vm_name}: need {request.dedicated_cpus} distinct CPUs, got {pcpus}")
    if not taken <= host.free_pcpus:
        busy = sorted(taken - host.free_pcpus)
        raise ValueError(f"{request.vm_name}: CPUs {busy} are not free on {host.host_id}")
    used = dict(host.used)
    for resource, amount in request.resources.items():
        used[resource] = used.get(resource, 0) + amount
    return replace(
        host,
        used=FrozenMap(used),
        free_pcpus=host.free_pcpus - taken,
        vm_count=host.vm_count + 1,
    )


def apply_placement(
    snapshot: FleetSnapshot, request: PlacementRequest, placement: Placement
) -> FleetSnapshot:
    """The snapshot after ``placement`` was claimed: the host via :func:`apply_claim` and
    the request's server group gaining a member there. For simulations and tests.
    """
    hosts = tuple(
        apply_claim(h, request, placement.pcpus) if h.host_id == placement.host_id else h
        for h in snapshot.hosts
    )
    groups = snapshot.server_groups
    if request.group is not None:
        groups = tuple(_add_member(g, placement.host_id) if g.name == request.group else g for g in groups)
    return replace(snapshot, hosts=hosts, server_groups=groups)


def _add_member(group: ServerGroup, host_id: str) -> ServerGroup:
    members = dict(group.members)
    members[host_id] = members.get(host_id, 0) + 1
    return replace(group, members=FrozenMap(members))


def explain(result: Placement | Refusal, *, max_hosts: int | None = 20) -> str:
    """Multi-line text for ``--dry-run`` and logs: the decision, the ranking, the rejections."""
    if isinstance(result, Refusal):
        lines = [result.headline()]
        lines.extend(f"  {line}" for line in result.summary(max_hosts).split("; ") if line)
        return "\n".join(lines)
    lines = [f"chosen host: {result.host_id}"]
    if result.alternates:
        lines.append(f"alternates: {', '.join(result.alternates)}")
    if result.pcpus:
        lines.append(f"dedicated cpus: {','.join(map(str, result.pcpus))}")
    lines.append("ranking:")
    for position, candidate in enumerate(result.ranked, start=1):
        parts = " ".join(f"{name}={value:.3f}" for name, value in candidate.weights.items())
        lines.append(f"  {position}. {candidate.host_id} score={candidate.score:.3f} {parts}".rstrip())
    if result.rejections:
        lines.append("rejected:")
        lines.extend(f"  {line}" for line in result.summary(max_hosts).split("; "))
    return "\n".join(lines)
