"""Property tests: random fleets, random request sequences applied claim by claim.

The oracle below re-implements the rules from their definitions (Nova placement's
capacity formula and the plain meaning of each rule) without calling scheduler code, so
a bug shared by the filters and place() cannot hide from it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controller import scheduler as sched
from controller.scheduler.filters import build_context, host_rejections

R = sched.ResourceClass
SHARED = (R.VCPU, R.MEMORY_MIB, R.DISK_GIB, R.HUGEPAGES_2M)
NETWORKS = ("default", "prod", "san")
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- oracle -----------------------------------------------------------------------------


def oracle_capacity(inventory: sched.Inventory) -> int:
    """Placement's formula, from the raw fields."""
    return max(0, math.floor((inventory.total - inventory.reserved) * inventory.allocation_ratio))


def oracle_fits_resource(host: sched.HostState, resource: sched.ResourceClass, amount: int) -> bool:
    inventory = host.inventories.get(resource)
    if inventory is None:
        return False
    used = host.used.get(resource, 0)
    max_unit = oracle_capacity(inventory) if inventory.max_unit is None else inventory.max_unit
    return (
        used + amount <= oracle_capacity(inventory)
        and inventory.min_unit <= amount <= max_unit
        and amount % inventory.step_size == 0
    )


def oracle_accepts(
    host: sched.HostState, request: sched.PlacementRequest, group: sched.ServerGroup | None
) -> bool:
    """Does ``host`` pass every hard rule for ``request``? Written from the rules' definitions."""
    if not host.up or not host.enabled or host.maintenance:
        return False
    if host.max_vms is not None and host.vm_count >= host.max_vms:
        return False
    if host.host_id in request.exclude_hosts:
        return False
    if request.force_host is not None and host.host_id != request.force_host:
        return False
    if request.needs_hw_virt and not (host.has_hw_virt and host.hypervisor_type.lower() in ("kvm", "xen")):
        return False
    if not set(request.networks) <= set(host.networks) or not set(request.bridges) <= set(host.bridges):
        return False
    if any(
        amount > 0 and not oracle_fits_resource(host, rc, amount) for rc, amount in request.resources.items()
    ):
        return False
    if request.dedicated_cpus > len(host.free_pcpus):
        return False
    if group is not None:
        here = group.members.get(host.host_id, 0)
        has_members = any(count > 0 for count in group.members.values())
        if group.policy is sched.GroupPolicy.AFFINITY and has_members and here == 0:
            return False
        if group.policy is sched.GroupPolicy.ANTI_AFFINITY and here >= group.max_per_host:
            return False
    return True


def oracle_n_plus_one_holds(hosts: tuple[sched.HostState, ...]) -> bool:
    """After a placement: the memory-fullest up host's usage fits the others' free space."""
    up = [h for h in hosts if h.up]
    if not up:
        return True
    fullest = min(up, key=lambda h: (-h.used.get(R.MEMORY_MIB, 0), h.host_id))
    others = [h for h in up if h is not fullest and h.enabled and not h.maintenance]
    for rc in (R.MEMORY_MIB, R.VCPU, R.DISK_GIB):
        free = 0
        for h in others:
            if rc in h.inventories:
                free += max(0, oracle_capacity(h.inventories[rc]) - h.used.get(rc, 0))
        if fullest.used.get(rc, 0) > free:
            return False
    return True


# --- strategies --------------------------------------------------------------------------
# Hypothesis draws one seed per host (and per request) and the object is built from it
# with random.Random: a draw costs tens of microseconds here, and a fleet described field
# by field needs ~500 of them. Shrinking still works where it matters: hosts are dropped
# from the list one by one and each seed shrinks on its own.

SEEDS = st.integers(0, 2**32 - 1)


def random_inventory(rng: random.Random, resource: sched.ResourceClass) -> tuple[sched.Inventory, int]:
    """An inventory of ``resource`` (sometimes with unit rules) and a usage within capacity."""
    unusual = rng.random() < 0.25
    min_unit = rng.randint(1, 3) if unusual else 1
    inventory = sched.Inventory.for_class(
        resource,
        rng.randint(0, 64),
        reserved=rng.randint(0, 8),
        allocation_ratio=rng.choice((0.5, 1.0, 1.5, 2.0, 4.0, 16.0)),
        min_unit=min_unit,
        max_unit=rng.choice((None, rng.randint(min_unit, 40))) if unusual else None,
        step_size=rng.randint(1, 3) if unusual else 1,
    )
    return inventory, rng.randint(0, inventory.capacity)


def random_host(index: int, seed: int) -> sched.HostState:
    rng = random.Random(seed)
    inventory: dict[sched.ResourceClass, sched.Inventory] = {}
    used: dict[sched.ResourceClass, int] = {}
    for resource in SHARED:
        if rng.random() < 0.9:  # now and then a host lacks a resource entirely
            inventory[resource], used[resource] = random_inventory(rng, resource)
    cpus = rng.randint(0, 12)
    busy = frozenset(cpu for cpu in range(cpus) if rng.random() < 0.3)
    if cpus:
        inventory[R.PCPU] = sched.Inventory.for_class(R.PCPU, cpus)
        used[R.PCPU] = len(busy)
    max_vms = rng.choice((None, None, rng.randint(0, 6)))
    return sched.HostState(
        host_id=f"h{index:02d}",
        inventories=inventory,
        used=used,
        up=rng.random() < 0.9,
        enabled=rng.random() < 0.9,
        maintenance=rng.random() < 0.1,
        has_hw_virt=rng.random() < 0.8,
        hypervisor_type=rng.choice(("kvm", "kvm", "qemu", "xen", "test", "KVM")),
        networks=frozenset(n for n in NETWORKS if rng.random() < 0.7),
        bridges=frozenset(b for b in ("br0", "br1") if rng.random() < 0.7),
        vm_count=0 if max_vms is None else rng.randint(0, max_vms),
        max_vms=max_vms,
        free_pcpus=frozenset(range(cpus)) - busy,
        pcpu_numa={cpu: cpu % 2 for cpu in range(cpus)},
    )


def build_fleet(seeds: list[int], group_policy: sched.GroupPolicy, max_per_host: int) -> sched.FleetSnapshot:
    group = sched.ServerGroup(name="g", policy=group_policy, max_per_host=max_per_host)
    hosts = tuple(random_host(index, seed) for index, seed in enumerate(seeds))
    return sched.FleetSnapshot(hosts=hosts, server_groups=(group,), now=0.0)


fleets = st.builds(
    build_fleet,
    st.lists(SEEDS, min_size=1, max_size=20),
    st.sampled_from(list(sched.GroupPolicy)),
    st.integers(1, 3),
)


def build_request(seed: int, index: int = 0) -> sched.PlacementRequest:
    rng = random.Random(seed)
    return sched.PlacementRequest(
        vm_name=f"vm-{index}",
        resources={rc: rng.randint(0, 10) for rc in SHARED if rng.random() < 0.5},
        dedicated_cpus=rng.choice((0, 0, 0, 1, 2, 3)),
        needs_hw_virt=rng.random() < 0.3,
        networks=frozenset(n for n in NETWORKS if rng.random() < 0.1),
        bridges=frozenset({"br0"}) if rng.random() < 0.2 else frozenset(),
        group="g" if rng.random() < 0.5 else None,
        exclude_hosts=frozenset({rng.choice(("h00", "h01", "h02"))}) if rng.random() < 0.2 else frozenset(),
        force_host=rng.choice(("h00", "h03", "zz")) if rng.random() < 0.15 else None,
        prefer_numa_local=rng.random() < 0.5,
    )


requests = SEEDS.map(build_request)


policies = st.builds(
    sched.PlacementPolicy,
    strategy=st.sampled_from(list(sched.Strategy)),
    n_plus_one=st.booleans(),
    max_alternates=st.integers(0, 3),
    max_ranked=st.one_of(st.none(), st.integers(0, 5)),
)


# --- properties --------------------------------------------------------------------------


def assert_within_capacity(hosts: tuple[sched.HostState, ...], start: Mapping[str, sched.HostState]) -> None:
    for host in hosts:
        for rc, inventory in host.inventories.items():
            used = host.used.get(rc, 0)
            # A placement never pushes a host over; hosts we did not touch keep their usage.
            assert used <= oracle_capacity(inventory) or used == start[host.host_id].used.get(rc, 0), (
                host.host_id,
                rc,
                used,
            )


@SETTINGS
@given(fleets, st.data(), policies)
def test_sequences_respect_capacity_rules_and_pcpus(
    snapshot: sched.FleetSnapshot, data: st.DataObject, policy: sched.PlacementPolicy
) -> None:
    start = {h.host_id: h for h in snapshot.hosts}
    assigned: dict[str, set[int]] = {h.host_id: set() for h in snapshot.hosts}
    for index, seed in enumerate(data.draw(st.lists(SEEDS, min_size=1, max_size=12), label="requests")):
        request = build_request(seed, index)
        group = snapshot.group("g") if request.group else None
        eligible = [h.host_id for h in snapshot.hosts if oracle_accepts(h, request, group)]
        result = sched.place(snapshot, request, policy)
        event("placed" if isinstance(result, sched.Placement) else "refused")
        if isinstance(result, sched.Refusal):
            # (2) refused only if no host passes every rule (N+1 may refuse on top of them)
            assert policy.n_plus_one or not eligible, (eligible, result.summary())
            assert {r.host_id for r in result.reasons} >= set(eligible)
            continue
        assert result.host_id in eligible, result.host_id
        assert set(result.alternates) <= set(eligible) - {result.host_id}
        host = next(h for h in snapshot.hosts if h.host_id == result.host_id)
        # (3) dedicated CPUs: the right number, free on that host, never handed out twice
        assert len(result.pcpus) == len(set(result.pcpus)) == request.dedicated_cpus
        assert set(result.pcpus) <= host.free_pcpus
        assert not set(result.pcpus) & assigned[host.host_id]
        assert not set(result.pcpus) & (start[host.host_id].pcpu_numa.keys() - start[host.host_id].free_pcpus)
        assigned[host.host_id] |= set(result.pcpus)
        snapshot = sched.apply_placement(snapshot, request, result)
        if policy.n_plus_one:
            assert oracle_n_plus_one_holds(snapshot.hosts)
        # (1) no host ever exceeds its capacity
        assert_within_capacity(snapshot.hosts, start)
        if request.group:
            members = snapshot.group("g")
            if members.policy is sched.GroupPolicy.ANTI_AFFINITY:
                assert max(members.members.values()) <= members.max_per_host


@SETTINGS
@given(fleets, requests, policies)
def test_every_host_is_either_ranked_or_explained(
    snapshot: sched.FleetSnapshot, request: sched.PlacementRequest, policy: sched.PlacementPolicy
) -> None:
    """The fast path in place() agrees with the full evaluation of every rule."""
    policy = sched.PlacementPolicy(
        strategy=policy.strategy, n_plus_one=False, max_alternates=policy.max_alternates, max_ranked=None
    )
    result = sched.place(snapshot, request, policy)
    ctx = build_context(snapshot, request)
    rejected_by_rules = {h.host_id for h in snapshot.hosts if host_rejections(h, ctx)}
    group = snapshot.group("g") if request.group else None
    oracle_rejected = {h.host_id for h in snapshot.hosts if not oracle_accepts(h, request, group)}
    assert rejected_by_rules == oracle_rejected
    explained = {
        r.host_id for r in (result.reasons if isinstance(result, sched.Refusal) else result.rejections)
    }
    ids = {h.host_id for h in snapshot.hosts}
    if request.force_host is not None and request.force_host not in ids:
        assert request.force_host in explained  # "forced host is not in the fleet"
        explained.discard(request.force_host)
    assert explained == rejected_by_rules
    if isinstance(result, sched.Placement):
        ranked = [c.host_id for c in result.ranked]
        assert set(ranked) == {h.host_id for h in snapshot.hosts} - rejected_by_rules
        assert len(ranked) == len(set(ranked))
        scores = [c.score for c in result.ranked]
        assert scores == sorted(scores, reverse=True)
        assert result.host_id == ranked[0]
        assert result.alternates == tuple(ranked[1 : 1 + policy.max_alternates])
        for candidate in result.ranked:
            assert math.isclose(candidate.score, sum(candidate.weights.values()), abs_tol=1e-9)


@SETTINGS
@given(fleets, requests, policies, st.randoms(use_true_random=False))
def test_place_is_deterministic_and_order_independent(
    snapshot: sched.FleetSnapshot,
    request: sched.PlacementRequest,
    policy: sched.PlacementPolicy,
    rng: random.Random,
) -> None:
    first = sched.place(snapshot, request, policy)
    shuffled = list(snapshot.hosts)
    rng.shuffle(shuffled)
    second = sched.place(
        sched.FleetSnapshot(hosts=tuple(shuffled), server_groups=snapshot.server_groups), request, policy
    )
    assert type(first) is type(second)
    if isinstance(first, sched.Placement) and isinstance(second, sched.Placement):
        assert (first.host_id, first.alternates, first.pcpus) == (
            second.host_id,
            second.alternates,
            second.pcpus,
        )
        assert [c.host_id for c in first.ranked] == [c.host_id for c in second.ranked]
    assert sched.place(snapshot, request, policy) == first
