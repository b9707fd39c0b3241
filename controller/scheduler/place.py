"""``place()``: choose a host for one VM, or explain why none fits.

Pure and deterministic: the same snapshot, request and policy always give the same
answer; nothing here reads a clock, the database or the network. The caller claims the
chosen host with the snapshot's ``generation`` and, if the build fails there, tries the
alternates in order, then calls ``place()`` again with the failed hosts excluded.
"""

from __future__ import annotations

import random
from dataclasses import replace

from controller.scheduler.cpus import pick_pcpus
from controller.scheduler.filters import (
    FilterContext,
    Headroom,
    build_context,
    host_rejections,
    passes,
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
from controller.scheduler.weighers import Scores, rank, score_hosts

__all__ = ["apply_claim", "apply_placement", "decide", "explain", "place", "ranked_limit"]

_DEFAULT_POLICY = PlacementPolicy()


def _filter_hosts(snapshot: FleetSnapshot, ctx: FilterContext) -> tuple[list[HostState], list[HostRejection]]:
    """Split hosts into those passing every host rule and the rejections of the others.

    :func:`~controller.scheduler.filters.passes` is the fast check; only a rejected host
    pays for the full evaluation, which collects every rule it fails for the explanation.
    """
    passed: list[HostState] = []
    rejected: list[HostRejection] = []
    for host in snapshot.hosts:
        if passes(host, ctx):
            passed.append(host)
        else:
            rejected.extend(host_rejections(host, ctx))
    return passed, rejected


def place(
    snapshot: FleetSnapshot,
    request: PlacementRequest,
    policy: PlacementPolicy = _DEFAULT_POLICY,
    *,
    rng: random.Random | None = None,
) -> Placement | Refusal:
    """Choose a host for ``request``, or return a :class:`Refusal` naming every host's reasons.

    Steps: every host through every applicable filter; N+1 (if the policy asks) on the
    survivors; weigh the rest; the best is chosen (or one of the best
    ``policy.choose_among`` at random, see :func:`decide`), the next ``max_alternates``
    are the alternates; dedicated CPUs are picked on the chosen host. Raises
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
    return decide(scores, request, policy, rejections=tuple(rejected), rng=rng)


def ranked_limit(policy: PlacementPolicy) -> int | None:
    """How many of the best candidates a decision needs in order (``None``: all)."""
    wanted = max(1 + policy.max_alternates, policy.choose_among)
    return None if policy.max_ranked is None else max(policy.max_ranked, wanted)


def decide(
    scores: Scores,
    request: PlacementRequest,
    policy: PlacementPolicy,
    *,
    rejections: tuple[HostRejection, ...] = (),
    rng: random.Random | None = None,
) -> Placement:
    """The :class:`Placement` for weighed candidates: rank, choose, pick dedicated CPUs.

    ``scores`` must hold at least the best :func:`ranked_limit` candidates of the whole
    candidate set (more are fine). With ``policy.choose_among`` = k > 1 the chosen host
    is drawn uniformly from the best k with ``rng``; without one, ``random.Random(vm
    name)`` keeps the call pure and repeatable while different VMs draw differently.
    The chosen host comes first in ``ranked``, then the others in order.
    """
    order = rank(scores, ranked_limit(policy))
    among = min(policy.choose_among, len(order))
    if among > 1:
        # Spreading concurrent decisions, not secrecy: a seeded PRNG is what keeps it pure.
        draw = (rng or random.Random(request.vm_name)).randrange(among)  # noqa: S311
        order.insert(0, order.pop(draw))
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
        alternates=tuple(scores.hosts[i].host_id for i in order[1 : 1 + policy.max_alternates]),
        ranked=tuple(scores.candidate(i) for i in order),
        pcpus=pcpus,
        rejections=rejections,
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
