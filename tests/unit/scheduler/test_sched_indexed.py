"""place_indexed() over a HostIndex decides exactly as place() over the whole snapshot.

The property tests compare the two on random fleets, requests and policies (negative and
zero multipliers, every weighed resource, soft and hard groups, N+1, ``--host``), and
again after random sequences of upserts and removes, so the index's bookkeeping is held
to "the same as rebuilding it". Small fleets with small capacities make exact ties
common (the threshold's hardest case); a seeded 2,000-host fleet makes the search stop
long before the end of its lists (the case the index exists for).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import scheduler as sched
from controller.scheduler.filters import Headroom
from controller.scheduler.index import HostIndex
from controller.scheduler.indexed import place_indexed

R = sched.ResourceClass
NETWORKS = ("default", "prod", "san")
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEEDS = st.integers(0, 2**32 - 1)


def random_host(host_id: str, seed: int, *, scale: int = 1) -> sched.HostState:
    """A host with small (tie-prone) or, with ``scale``, larger capacities and usage."""
    rng = random.Random(seed)
    inventories: dict[sched.ResourceClass, sched.Inventory] = {}
    used: dict[sched.ResourceClass, int] = {}
    for resource in (R.VCPU, R.MEMORY_MIB, R.DISK_GIB, R.HUGEPAGES_2M):
        if rng.random() < 0.9:
            unusual = rng.random() < 0.15
            inventory = sched.Inventory.for_class(
                resource,
                rng.choice((8, 16, 32)) * scale,
                reserved=rng.randint(0, 2),
                allocation_ratio=rng.choice((1.0, 1.0, 2.0, 4.0)),
                min_unit=2 if unusual else 1,
                step_size=2 if unusual else 1,
            )
            inventories[resource] = inventory
            used[resource] = rng.randint(0, inventory.capacity)
    cpus = rng.randint(0, 8)
    busy = frozenset(cpu for cpu in range(cpus) if rng.random() < 0.3)
    if cpus:
        inventories[R.PCPU] = sched.Inventory.for_class(R.PCPU, cpus)
        used[R.PCPU] = len(busy)
    max_vms = rng.choice((None, None, rng.randint(0, 6)))
    roll = rng.random()
    return sched.HostState(
        host_id=host_id,
        inventories=inventories,
        used=used,
        up=roll >= 0.05,
        down_since=None if roll >= 0.05 else 1_700_000_000.0,
        enabled=not 0.05 <= roll < 0.1,
        maintenance=0.1 <= roll < 0.13,
        has_hw_virt=rng.random() < 0.85,
        hypervisor_type=rng.choice(("kvm", "kvm", "qemu", "xen", "KVM")),
        networks=frozenset(n for n in NETWORKS if rng.random() < 0.7),
        bridges=frozenset(b for b in ("br0", "br1") if rng.random() < 0.8),
        vm_count=0 if max_vms is None else rng.randint(0, max_vms),
        max_vms=max_vms,
        free_pcpus=frozenset(range(cpus)) - busy,
        pcpu_numa={cpu: cpu % 2 for cpu in range(cpus)},
        cpus=rng.choice((0, 8, 16, 32)),
    )


def random_request(seed: int, host_ids: list[str], *, scale: int = 1) -> sched.PlacementRequest:
    rng = random.Random(seed)
    resources = {
        rc: rng.randint(0, 6 * scale) for rc in (R.VCPU, R.MEMORY_MIB, R.DISK_GIB) if rng.random() < 0.7
    }
    if rng.random() < 0.1:
        resources[R.HUGEPAGES_2M] = rng.randint(1, 4)
    return sched.PlacementRequest(
        vm_name=f"vm-{seed}",
        resources=resources,
        dedicated_cpus=rng.choice((0, 0, 0, 0, 1, 2)),
        needs_hw_virt=rng.random() < 0.3,
        networks=frozenset(n for n in NETWORKS if rng.random() < 0.2),
        bridges=frozenset({"br0"}) if rng.random() < 0.2 else frozenset(),
        group="g" if rng.random() < 0.5 else None,
        exclude_hosts=frozenset(rng.sample(host_ids, min(2, len(host_ids))))
        if rng.random() < 0.2
        else frozenset(),
        force_host=rng.choice([*host_ids[:2], "absent"]) if rng.random() < 0.1 else None,
        prefer_numa_local=rng.random() < 0.5,
        highest_cpu=rng.choice((None, None, None, 5, 12, 20)),
    )


def random_group(seed: int, host_ids: list[str]) -> sched.ServerGroup:
    rng = random.Random(seed)
    members = {h: rng.randint(1, 3) for h in host_ids if rng.random() < 0.2}
    return sched.ServerGroup(
        name="g", policy=rng.choice(list(sched.GroupPolicy)), max_per_host=rng.randint(1, 3), members=members
    )


multipliers = st.dictionaries(
    st.sampled_from(list(R)), st.sampled_from((0.0, 1.0, 1.0, 2.5, -1.0, 0.5)), max_size=len(R)
)
policies = st.builds(
    sched.PlacementPolicy,
    strategy=st.sampled_from(list(sched.Strategy)),
    multipliers=st.one_of(st.just({R.VCPU: 1.0, R.MEMORY_MIB: 1.0, R.DISK_GIB: 1.0}), multipliers),
    group_multiplier=st.sampled_from((10.0, 1.0, 0.0, -2.0)),
    n_plus_one=st.booleans(),
    max_alternates=st.integers(0, 3),
    max_ranked=st.one_of(st.none(), st.integers(0, 5)),
    choose_among=st.sampled_from((1, 1, 2, 3)),
)


def assert_same(
    index: HostIndex, request: sched.PlacementRequest, policy: sched.PlacementPolicy, group: sched.ServerGroup
) -> sched.Placement | sched.Refusal:
    snapshot = index.snapshot((group,), now=1_700_000_600.0)
    expected = sched.place(snapshot, request, policy, rng=random.Random(7))
    got = place_indexed(
        index, request, policy, server_groups=(group,), now=1_700_000_600.0, rng=random.Random(7)
    )
    if isinstance(expected, sched.Refusal) or policy.max_ranked is None:
        assert got == expected  # these paths are the full walk: identical, reasons included
    else:
        assert isinstance(got, sched.Placement), got
        assert (got.host_id, got.alternates, got.pcpus) == (
            expected.host_id,
            expected.alternates,
            expected.pcpus,
        )
        assert got.ranked == expected.ranked  # scores and per-weigher breakdown, bit for bit
        assert got.rejections == ()
    return expected


@SETTINGS
@given(st.lists(SEEDS, min_size=0, max_size=24), SEEDS, SEEDS, policies)
def test_indexed_placement_equals_full_walk(
    host_seeds: list[int], request_seed: int, group_seed: int, policy: sched.PlacementPolicy
) -> None:
    ids = [f"h{i:02d}" for i in range(len(host_seeds))]
    index = HostIndex(random_host(host_id, seed) for host_id, seed in zip(ids, host_seeds, strict=True))
    assert_same(index, random_request(request_seed, ids), policy, random_group(group_seed, ids))


@SETTINGS
@given(st.lists(SEEDS, min_size=1, max_size=16), st.lists(SEEDS, min_size=1, max_size=25), policies)
def test_indexed_placement_after_upserts_and_removes(
    host_seeds: list[int], steps: list[int], policy: sched.PlacementPolicy
) -> None:
    """Claims, state changes, new hosts and removals, each followed by a decision."""
    ids = [f"h{i:02d}" for i in range(len(host_seeds))]
    index = HostIndex(random_host(host_id, seed) for host_id, seed in zip(ids, host_seeds, strict=True))
    group = random_group(host_seeds[0], ids)
    for step in steps:
        rng = random.Random(step)
        request = random_request(step, ids)
        action = rng.random()
        if action < 0.45:
            # A claim, as the controller upserts it: the decision's host after apply_claim.
            result = assert_same(index, request, policy, group)
            if isinstance(result, sched.Placement):
                host = index.get(result.host_id)
                assert host is not None
                index.upsert(sched.apply_claim(host, request, result.pcpus))
            continue
        host_id = rng.choice([*ids, "h99"])
        if action < 0.8:
            index.upsert(random_host(host_id, step))  # a report, heartbeat or operator change
        elif action < 0.9 and host_id in index:
            old = index.get(host_id)
            assert old is not None
            index.upsert(replace(old, up=not old.up))  # the liveness sweep flips a host
        else:
            index.remove(host_id)
        assert_same(index, request, policy, group)
    rebuilt = HostIndex(index.hosts)
    assert rebuilt.hosts == index.hosts
    assert rebuilt.headroom(request) == index.headroom(request) == Headroom.of(index.hosts, request)


@pytest.mark.parametrize("strategy", list(sched.Strategy))
@pytest.mark.parametrize("n_plus_one", [False, True])
@pytest.mark.parametrize("group_policy", list(sched.GroupPolicy))
def test_large_fleet_stops_early_and_agrees(
    strategy: sched.Strategy, n_plus_one: bool, group_policy: sched.GroupPolicy
) -> None:
    ids = [f"host-{i:04d}" for i in range(2000)]
    index = HostIndex(random_host(host_id, 1000 + i, scale=64) for i, host_id in enumerate(ids))
    group = replace(random_group(5, ids[::20]), policy=group_policy)
    policy = sched.PlacementPolicy(strategy=strategy, n_plus_one=n_plus_one)
    for seed in range(12):
        assert_same(index, random_request(seed, ids, scale=16), policy, group)


def test_identical_hosts_tie_on_host_id() -> None:
    """Exact ties everywhere (a fresh rack): the lowest host ids win, as in place()."""
    inventory = {R.VCPU: sched.Inventory(64), R.MEMORY_MIB: sched.Inventory(1024)}
    hosts = [sched.HostState(host_id=f"n{i:03d}", inventories=inventory) for i in range(300)]
    hosts.append(sched.HostState(host_id="busy", inventories=inventory, used={R.VCPU: 8}))
    index = HostIndex(reversed(hosts))
    request = sched.PlacementRequest(vm_name="vm", resources={R.VCPU: 2}, group="g")
    members = {"n007": 1, "n000": 2, "n150": 1}
    for strategy in sched.Strategy:
        for group_policy in sched.GroupPolicy:
            for weighed in ({}, {R.MEMORY_MIB: 1.0}, {R.VCPU: 1.0}):
                group = sched.ServerGroup(name="g", policy=group_policy, max_per_host=2, members=members)
                policy = sched.PlacementPolicy(strategy=strategy, multipliers=weighed)
                result = assert_same(index, request, policy, group)
                assert isinstance(result, sched.Placement)
    request = replace(request, group=None)
    result = place_indexed(index, request)
    assert isinstance(result, sched.Placement)
    assert (result.host_id, result.alternates) == ("n000", ("n001", "n002"))


def test_refusal_is_the_full_walk() -> None:
    host = sched.HostState(host_id="a", inventories={R.VCPU: sched.Inventory(4)}, up=False, down_since=0.0)
    index = HostIndex([host, replace(host, host_id="b", up=True, down_since=None)])
    request = sched.PlacementRequest(vm_name="big", resources={R.VCPU: 8})
    result = place_indexed(index, request, now=60.0)
    assert result == sched.place(index.snapshot(now=60.0), request)
    assert isinstance(result, sched.Refusal)
    assert (
        result.summary()
        == "a: down since 00:00:00 UTC, vcpu short by 4 vCPU at ratio 1.0; b: vcpu short by 4 vCPU at ratio 1.0"
    )


def test_unknown_group_raises_as_place_does() -> None:
    index = HostIndex([sched.HostState(host_id="a", inventories={R.VCPU: sched.Inventory(4)})])
    request = sched.PlacementRequest(vm_name="vm", resources={R.VCPU: 1}, group="nope")
    with pytest.raises(sched.UnknownServerGroupError):
        place_indexed(index, request)


def test_index_bookkeeping() -> None:
    a = sched.HostState(
        host_id="a", inventories={R.MEMORY_MIB: sched.Inventory(100)}, used={R.MEMORY_MIB: 90}
    )
    b = replace(a, host_id="b", used={R.MEMORY_MIB: 10})
    index = HostIndex([a, b])
    assert (len(index), index.generation, "a" in index, "z" in index) == (2, 2, True, False)
    index.upsert(replace(a, used={}))  # keeps its position
    assert [h.host_id for h in index.hosts] == ["a", "b"]
    index.remove("a")
    index.remove("a")  # idempotent: no second bump
    assert (len(index), index.generation, index.get("a")) == (1, 4, None)
    index.upsert(a)
    assert [h.host_id for h in index.hosts] == ["b", "a"]  # a removed host comes back last
    request = sched.PlacementRequest(vm_name="vm", resources={R.MEMORY_MIB: 5})
    assert index.headroom(request) == Headroom.of(index.hosts, request)


def test_choose_among_picks_within_the_best_k() -> None:
    hosts = [
        sched.HostState(host_id=f"h{i}", inventories={R.VCPU: sched.Inventory(16)}, used={R.VCPU: i})
        for i in range(8)
    ]
    index = HostIndex(hosts)
    request = sched.PlacementRequest(vm_name="vm", resources={R.VCPU: 1})
    default = place_indexed(index, request)
    assert isinstance(default, sched.Placement)
    assert (default.host_id, default.alternates) == ("h0", ("h1", "h2"))  # k = 1: today's choice
    policy = sched.PlacementPolicy(choose_among=3)
    chosen = set()
    for seed in range(40):
        result = place_indexed(index, request, policy, rng=random.Random(seed))
        assert result == sched.place(index.snapshot(), request, policy, rng=random.Random(seed))
        assert isinstance(result, sched.Placement)
        chosen.add(result.host_id)
        # The others of the best three stay the first alternates, in order.
        assert result.alternates == tuple(h for h in ("h0", "h1", "h2", "h3") if h != result.host_id)[:2]
    assert chosen == {"h0", "h1", "h2"}
    # Without an rng the draw is seeded by the VM name: pure and repeatable.
    assert place_indexed(index, request, policy) == place_indexed(index, request, policy)
    with pytest.raises(ValueError, match="choose_among"):
        sched.PlacementPolicy(choose_among=0)


@pytest.mark.parametrize(
    "group_policy", [sched.GroupPolicy.SOFT_AFFINITY, sched.GroupPolicy.SOFT_ANTI_AFFINITY]
)
def test_group_weigher_bounds_when_only_members_pass(group_policy: sched.GroupPolicy) -> None:
    """The group column's low end is a member's count, not 0, when no outsider passes."""
    inventory = {R.VCPU: sched.Inventory(16)}
    hosts = [
        sched.HostState(host_id="a", inventories=inventory, networks=frozenset({"prod"})),
        sched.HostState(host_id="b", inventories=inventory, networks=frozenset({"prod"}), used={R.VCPU: 4}),
        sched.HostState(host_id="c", inventories=inventory, networks=frozenset({"prod"}), used={R.VCPU: 2}),
        sched.HostState(host_id="d", inventories=inventory),
    ]
    group = sched.ServerGroup(name="g", policy=group_policy, members={"a": 1, "b": 3, "c": 2})
    request = sched.PlacementRequest(
        vm_name="vm", resources={R.VCPU: 1}, group="g", networks=frozenset({"prod"})
    )
    assert_same(HostIndex(hosts), request, sched.PlacementPolicy(), group)


def test_a_tie_on_the_bound_across_two_walked_columns() -> None:
    """The k-th best scores exactly what an unseen host could: the walk may stop only when
    host ids settle the tie (found by a random search; stopping on every tie picks h6)."""
    shapes = {  # host: (VCPU total, used), (MEMORY_MIB total, used)
        "h0": ((8, 3), (8, 2)),
        "h1": ((4, 0), (4, 0)),
        "h2": ((4, 0), (8, 2)),
        "h3": ((4, 0), (4, 0)),
        "h4": ((8, 3), (4, 3)),
        "h5": ((8, 3), (8, 3)),
        "h6": ((4, 2), (8, 1)),
        "h7": ((8, 2), (4, 3)),
    }
    hosts = [
        sched.HostState(
            host_id=host_id,
            inventories={R.VCPU: sched.Inventory(vcpu[0]), R.MEMORY_MIB: sched.Inventory(memory[0])},
            used={R.VCPU: vcpu[1], R.MEMORY_MIB: memory[1]},
        )
        for host_id, (vcpu, memory) in shapes.items()
    ]
    policy = sched.PlacementPolicy(
        strategy=sched.Strategy.PACK,
        multipliers={R.VCPU: 1.0, R.MEMORY_MIB: 1.0},
        max_alternates=2,
        max_ranked=1,
    )
    request = sched.PlacementRequest(vm_name="vm", resources={R.VCPU: 1})
    group = sched.ServerGroup(name="g", policy=sched.GroupPolicy.SOFT_AFFINITY, members={})
    expected = assert_same(HostIndex(hosts), request, policy, group)
    assert isinstance(expected, sched.Placement)
    assert (expected.host_id, expected.alternates) == ("h4", ("h1", "h3"))


def test_many_ties_across_two_walked_columns_agree() -> None:
    """Small fleets of tie-prone hosts weighed on two resources (seeded, 3,000 of them): where
    the walk's lists and the scheduler disagree on the order of equal hosts, this fails."""
    for seed in range(3000):
        rng = random.Random(seed)
        hosts = [
            sched.HostState(
                host_id=f"h{i}",
                inventories={
                    R.VCPU: sched.Inventory(rng.choice((4, 8))),
                    R.MEMORY_MIB: sched.Inventory(rng.choice((4, 8))),
                },
                used={R.VCPU: rng.randint(0, 3), R.MEMORY_MIB: rng.randint(0, 3)},
            )
            for i in range(rng.randint(2, 8))
        ]
        policy = sched.PlacementPolicy(
            strategy=rng.choice(list(sched.Strategy)),
            multipliers={R.VCPU: 1.0, R.MEMORY_MIB: rng.choice((1.0, 2.0, 0.5))},
            max_alternates=rng.randint(0, 2),
            max_ranked=rng.randint(0, 3),
        )
        request = sched.PlacementRequest(vm_name="vm", resources={R.VCPU: 1})
        group = sched.ServerGroup(name="g", policy=sched.GroupPolicy.SOFT_AFFINITY, members={})
        assert_same(HostIndex(rng.sample(hosts, len(hosts))), request, policy, group)
