"""place(): strategies, alternates, rules that steer the choice, N+1, claims, explanations."""

from __future__ import annotations

import random
from typing import Any

import pytest

from controller.scheduler import (
    FleetSnapshot,
    GroupPolicy,
    HostState,
    Inventory,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    ResourceClass,
    Rule,
    ServerGroup,
    Strategy,
    UnknownServerGroupError,
    apply_claim,
    apply_placement,
    explain,
    place,
)

R = ResourceClass
MEMORY_ONLY = PlacementPolicy(multipliers={R.MEMORY_MIB: 1.0})


def make_host(host_id: str, used_memory: int = 0, memory: int = 8192, **overrides: Any) -> HostState:
    fields: dict[str, Any] = {
        "host_id": host_id,
        "inventories": {
            R.VCPU: Inventory(8, 0, 4.0),
            R.MEMORY_MIB: Inventory(memory),
            R.DISK_GIB: Inventory(100),
        },
        "used": {R.MEMORY_MIB: used_memory},
        "networks": frozenset({"default"}),
    }
    fields.update(overrides)
    return HostState(**fields)


def make_request(memory: int = 1024, **overrides: Any) -> PlacementRequest:
    fields: dict[str, Any] = {"vm_name": "vm-1", "resources": {R.VCPU: 1, R.MEMORY_MIB: memory}}
    fields.update(overrides)
    return PlacementRequest(**fields)


def placed(result: Placement | Refusal) -> Placement:
    assert isinstance(result, Placement), result.summary() if isinstance(result, Refusal) else result
    return result


def refused(result: Placement | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# Free memory: host-a 6144, host-b 2048, host-c 4096, host-d 3072.
FLEET = FleetSnapshot(
    hosts=(
        make_host("host-a", 2048),
        make_host("host-b", 6144),
        make_host("host-c", 4096),
        make_host("host-d", 5120),
    )
)


def test_spread_prefers_most_free_and_orders_alternates() -> None:
    result = placed(place(FLEET, make_request(), MEMORY_ONLY))
    assert result.host_id == "host-a"
    assert result.alternates == ("host-c", "host-d")
    assert [c.host_id for c in result.ranked] == ["host-a", "host-c", "host-d", "host-b"]
    assert [c.score for c in result.ranked] == pytest.approx([1.0, 0.5, 0.25, 0.0])
    assert result.ranked[1].weights == {"memory_mib": pytest.approx(0.5)}


def test_a_cpuset_goes_only_to_hosts_that_have_its_cpus() -> None:
    narrow, wide = make_host("narrow", memory=16384, cpus=8), make_host("wide", memory=8192, cpus=32)
    unknown = make_host("unknown", memory=32768)  # no CPUs reported yet
    fleet = FleetSnapshot(hosts=(narrow, wide, unknown))
    assert placed(place(fleet, make_request(), MEMORY_ONLY)).host_id == "unknown"  # most free memory
    assert placed(place(fleet, make_request(highest_cpu=10), MEMORY_ONLY)).host_id == "wide"
    refusal = refused(place(fleet, make_request(highest_cpu=40), MEMORY_ONLY))
    by_host = {r.host_id: r for r in refusal.reasons}
    assert {r.rule for r in refusal.reasons} == {Rule.CPUSET}
    assert by_host["narrow"].message == "the cpuset names CPU 40, the host has CPUs 0-7"
    assert by_host["unknown"].message == "the cpuset names CPU 40, the host has not reported its CPUs"
    assert (by_host["wide"].requested, by_host["wide"].free, by_host["wide"].short_by) == (41, 32, 9)


def test_pack_prefers_least_free() -> None:
    policy = PlacementPolicy(strategy=Strategy.PACK, multipliers={R.MEMORY_MIB: 1.0})
    result = placed(place(FLEET, make_request(), policy))
    assert result.host_id == "host-b"
    assert result.alternates == ("host-d", "host-c")


def test_pack_skips_hosts_that_are_too_full() -> None:
    policy = PlacementPolicy(strategy=Strategy.PACK, multipliers={R.MEMORY_MIB: 1.0})
    result = placed(place(FLEET, make_request(memory=3000), policy))
    assert result.host_id == "host-d"
    assert [(r.host_id, r.rule) for r in result.rejections] == [("host-b", Rule.CAPACITY)]
    assert result.summary() == "host-b: memory short by 952 MiB at ratio 1.0"


def test_default_policy_weighs_several_resources() -> None:
    hosts = (
        make_host("h1", 0, used={R.VCPU: 30, R.MEMORY_MIB: 0}),
        make_host("h2", 1024),
    )
    result = placed(place(FleetSnapshot(hosts=hosts), make_request()))
    # h1 has more memory free but almost no vCPU: memory 1.0 vs vcpu 1.0 -> tie, h1 wins by id.
    assert [c.score for c in result.ranked] == pytest.approx([1.0, 1.0])
    assert result.host_id == "h1"
    assert set(result.ranked[0].weights) == {"vcpu", "memory_mib", "disk_gib"}


def test_alternates_and_ranked_limits() -> None:
    none = placed(place(FLEET, make_request(), PlacementPolicy(max_alternates=0, max_ranked=0)))
    assert none.alternates == ()
    assert len(none.ranked) == 1
    everything = placed(place(FLEET, make_request(), PlacementPolicy(max_alternates=10, max_ranked=None)))
    assert len(everything.alternates) == 3
    assert len(everything.ranked) == 4


def test_result_does_not_depend_on_host_order() -> None:
    hosts = tuple(make_host(f"h{i}", used_memory=1024 * (i % 3)) for i in range(12))
    request = make_request()
    expected = place(FleetSnapshot(hosts=hosts), request)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = list(hosts)
        rng.shuffle(shuffled)
        again = placed(place(FleetSnapshot(hosts=tuple(shuffled)), request))
        assert isinstance(expected, Placement)
        assert (again.host_id, again.alternates, again.ranked) == (
            expected.host_id,
            expected.alternates,
            expected.ranked,
        )
    # Ties (three groups of equal hosts) are broken by the lowest host id.
    assert isinstance(expected, Placement)
    assert (expected.host_id, expected.alternates) == ("h0", ("h3", "h6"))


def test_excluded_hosts_are_skipped_on_reschedule() -> None:
    result = placed(place(FLEET, make_request(exclude_hosts=frozenset({"host-a"})), MEMORY_ONLY))
    assert result.host_id == "host-c"
    assert [(r.host_id, r.rule) for r in result.rejections] == [("host-a", Rule.EXCLUDED)]


def test_forced_host_wins_over_weighing_but_not_over_rules() -> None:
    result = placed(place(FLEET, make_request(force_host="host-b"), MEMORY_ONLY))
    assert (result.host_id, result.alternates) == ("host-b", ())
    assert {r.rule for r in result.rejections} == {Rule.FORCED_HOST}

    too_big = refused(place(FLEET, make_request(memory=4096, force_host="host-b"), MEMORY_ONLY))
    assert too_big.summary(max_hosts=1) == ("host-a: not the forced host host-b; ... and 3 more hosts")
    mine = [r for r in too_big.reasons if r.host_id == "host-b"]
    assert [(r.rule, r.message) for r in mine] == [(Rule.CAPACITY, "memory short by 2048 MiB at ratio 1.0")]

    down = FleetSnapshot(hosts=(make_host("host-a", up=False), make_host("host-b")))
    assert [r.rule for r in refused(place(down, make_request(force_host="host-a"))).reasons] == [
        Rule.HOST_DOWN,
        Rule.FORCED_HOST,
    ]


def test_forced_host_not_in_fleet_is_named() -> None:
    result = refused(place(FLEET, make_request(force_host="host-z")))
    assert result.reasons[-1].host_id == "host-z"
    assert result.reasons[-1].message == "forced host is not in the fleet"


def test_max_vms_hw_virt_and_networks_steer_the_choice() -> None:
    hosts = (
        make_host("full", vm_count=10, max_vms=10),
        make_host("tcg", hypervisor_type="qemu"),
        make_host("isolated", networks=frozenset()),
        make_host("ok", used_memory=4096),
    )
    result = placed(
        place(FleetSnapshot(hosts=hosts), make_request(needs_hw_virt=True, networks=frozenset({"default"})))
    )
    assert result.host_id == "ok"
    assert [(r.host_id, r.rule) for r in result.rejections] == [
        ("full", Rule.MAX_VMS),
        ("tcg", Rule.HW_VIRT),
        ("isolated", Rule.NETWORK),
    ]


def group_fleet(policy: GroupPolicy, members: dict[str, int], max_per_host: int = 1) -> FleetSnapshot:
    group = ServerGroup(name="g", policy=policy, members=members, max_per_host=max_per_host)
    return FleetSnapshot(hosts=FLEET.hosts, server_groups=(group,))


def test_hard_affinity_follows_the_group() -> None:
    result = placed(
        place(group_fleet(GroupPolicy.AFFINITY, {"host-b": 1}), make_request(group="g"), MEMORY_ONLY)
    )
    assert result.host_id == "host-b"
    assert {r.rule for r in result.rejections} == {Rule.AFFINITY}
    first = placed(place(group_fleet(GroupPolicy.AFFINITY, {}), make_request(group="g"), MEMORY_ONLY))
    assert first.host_id == "host-a"


def test_hard_anti_affinity_avoids_members_and_can_refuse() -> None:
    snapshot = group_fleet(GroupPolicy.ANTI_AFFINITY, {"host-a": 1, "host-c": 1})
    assert placed(place(snapshot, make_request(group="g"), MEMORY_ONLY)).host_id == "host-d"
    crowded = group_fleet(GroupPolicy.ANTI_AFFINITY, {h.host_id: 2 for h in FLEET.hosts}, max_per_host=2)
    assert refused(place(crowded, make_request(group="g"))).tally() == {"anti_affinity": 4}


def test_soft_anti_affinity_outweighs_free_memory() -> None:
    snapshot = group_fleet(GroupPolicy.SOFT_ANTI_AFFINITY, {"host-a": 2, "host-c": 1, "host-d": 1})
    result = placed(place(snapshot, make_request(group="g"), MEMORY_ONLY))
    assert result.host_id == "host-b"
    assert result.ranked[0].weights["soft_anti_affinity"] == pytest.approx(10.0)
    assert not result.rejections


def test_soft_affinity_prefers_members_but_bends_when_full() -> None:
    snapshot = group_fleet(GroupPolicy.SOFT_AFFINITY, {"host-b": 3, "host-d": 1})
    assert placed(place(snapshot, make_request(group="g"), MEMORY_ONLY)).host_id == "host-b"
    big = placed(place(snapshot, make_request(memory=3000, group="g"), MEMORY_ONLY))
    assert big.host_id == "host-d"


def test_soft_group_weight_can_be_switched_off() -> None:
    snapshot = group_fleet(GroupPolicy.SOFT_ANTI_AFFINITY, {"host-a": 2})
    policy = PlacementPolicy(multipliers={R.MEMORY_MIB: 1.0}, group_multiplier=0.0)
    assert placed(place(snapshot, make_request(group="g"), policy)).host_id == "host-a"


def test_unknown_group_is_an_error() -> None:
    with pytest.raises(UnknownServerGroupError):
        place(FLEET, make_request(group="missing"))


def n_plus_one_fleet() -> FleetSnapshot:
    # host-1: 20 GiB, 10000 used; host-2: 10 GiB, 9500 used; host-3: 10 GiB, 2000 used.
    memory_only = {R.MEMORY_MIB: Inventory(20480)}
    small = {R.MEMORY_MIB: Inventory(10240)}
    return FleetSnapshot(
        hosts=(
            HostState(host_id="host-1", inventories=memory_only, used={R.MEMORY_MIB: 10000}),
            HostState(host_id="host-2", inventories=small, used={R.MEMORY_MIB: 9500}),
            HostState(host_id="host-3", inventories=small, used={R.MEMORY_MIB: 2000}),
        )
    )


def test_n_plus_one_steers_away_from_unrecoverable_hosts() -> None:
    request = PlacementRequest(vm_name="vm", resources={R.MEMORY_MIB: 700})
    assert placed(place(n_plus_one_fleet(), request)).host_id == "host-1"
    result = placed(place(n_plus_one_fleet(), request, PlacementPolicy(n_plus_one=True)))
    assert result.host_id == "host-2"  # it becomes the fullest, and the others can absorb it
    assert [(r.host_id, r.rule, r.message) for r in result.rejections] == [
        (
            "host-1",
            Rule.N_PLUS_ONE,
            "n+1: losing this host (10700 MiB memory in use) would leave memory short by 1720 MiB "
            "on the other hosts",
        ),
        (
            "host-3",
            Rule.N_PLUS_ONE,
            "n+1: losing host-1 (10000 MiB memory in use) would leave memory short by 1720 MiB "
            "on the other hosts",
        ),
    ]
    assert (result.rejections[0].resource, result.rejections[0].short_by) == (R.MEMORY_MIB, 1720)


def test_n_plus_one_ignores_hosts_that_cannot_absorb() -> None:
    inv = {R.MEMORY_MIB: Inventory(10240)}
    hosts = (
        HostState(host_id="a", inventories=inv, used={R.MEMORY_MIB: 4000}),
        HostState(host_id="b", inventories=inv, used={R.MEMORY_MIB: 0}, enabled=False),
        HostState(host_id="c", inventories=inv, used={R.MEMORY_MIB: 0}, up=False),
    )
    request = PlacementRequest(vm_name="vm", resources={R.MEMORY_MIB: 1000})
    result = refused(place(FleetSnapshot(hosts=hosts), request, PlacementPolicy(n_plus_one=True)))
    n1 = [r for r in result.reasons if r.rule == Rule.N_PLUS_ONE]
    assert [(r.host_id, r.short_by, r.free) for r in n1] == [("a", 5000, 0)]
    # The same fleet with "b" enabled can absorb the loss of "a".
    healthy = (hosts[0], HostState(host_id="b", inventories=inv), hosts[2])
    assert (
        placed(place(FleetSnapshot(hosts=healthy), request, PlacementPolicy(n_plus_one=True))).host_id == "b"
    )


def test_n_plus_one_checks_vcpu_and_disk_too() -> None:
    inv = {R.VCPU: Inventory(4, 0, 1.0), R.MEMORY_MIB: Inventory(8192), R.DISK_GIB: Inventory(100)}
    hosts = (
        HostState(host_id="a", inventories=inv, used={R.VCPU: 3, R.MEMORY_MIB: 1000, R.DISK_GIB: 10}),
        HostState(host_id="b", inventories=inv, used={R.VCPU: 2, R.MEMORY_MIB: 500, R.DISK_GIB: 10}),
    )
    request = PlacementRequest(vm_name="vm", resources={R.VCPU: 1, R.MEMORY_MIB: 100, R.DISK_GIB: 1})
    result = refused(place(FleetSnapshot(hosts=hosts), request, PlacementPolicy(n_plus_one=True)))
    assert {(r.host_id, r.resource) for r in result.reasons} == {("a", R.VCPU), ("b", R.VCPU)}


def pinned_host(host_id: str, free: frozenset[int]) -> HostState:
    return HostState(
        host_id=host_id,
        inventories={R.PCPU: Inventory.for_class(R.PCPU, 8), R.MEMORY_MIB: Inventory(8192)},
        used={R.PCPU: 8 - len(free)},
        free_pcpus=free,
        pcpu_numa={cpu: cpu // 4 for cpu in range(8)},
    )


def test_dedicated_cpus_are_picked_numa_local() -> None:
    snapshot = FleetSnapshot(hosts=(pinned_host("p1", frozenset({0, 1, 2, 5, 6, 7})),))
    request = PlacementRequest(vm_name="vm", resources={R.MEMORY_MIB: 1024}, dedicated_cpus=3)
    assert placed(place(snapshot, request)).pcpus == (0, 1, 2)
    request4 = PlacementRequest(vm_name="vm", resources={}, dedicated_cpus=4)
    assert placed(place(snapshot, request4)).pcpus == (0, 1, 2, 5)  # two cells needed anyway
    spread_out = PlacementRequest(vm_name="vm", resources={}, dedicated_cpus=2, prefer_numa_local=False)
    assert placed(place(snapshot, spread_out)).pcpus == (0, 1)


def test_apply_claim() -> None:
    host = pinned_host("p1", frozenset(range(8)))
    request = PlacementRequest(vm_name="vm", resources={R.MEMORY_MIB: 1024}, dedicated_cpus=2)
    after = apply_claim(host, request, (0, 1))
    assert after.used == {R.PCPU: 2, R.MEMORY_MIB: 1024}
    assert after.free_pcpus == frozenset(range(2, 8))
    assert (after.vm_count, after.generation) == (1, host.generation)
    assert after.free[R.MEMORY_MIB] == 8192 - 1024
    with pytest.raises(ValueError, match="not free"):
        apply_claim(after, request, (1, 2))
    with pytest.raises(ValueError, match="distinct"):
        apply_claim(after, request, (2, 2))
    with pytest.raises(ValueError, match="distinct"):
        apply_claim(after, request, (2,))


def test_apply_placement_updates_host_and_group() -> None:
    snapshot = group_fleet(GroupPolicy.ANTI_AFFINITY, {})
    request = make_request(group="g")
    first = placed(place(snapshot, request, MEMORY_ONLY))
    after = apply_placement(snapshot, request, first)
    assert after.group("g").members == {first.host_id: 1}
    second = placed(place(after, request, MEMORY_ONLY))
    assert second.host_id != first.host_id
    host = next(h for h in after.hosts if h.host_id == first.host_id)
    assert host.vm_count == 1
    assert host.used[R.MEMORY_MIB] == 2048 + 1024


def test_explain_renders_decision_and_rejections() -> None:
    snapshot = FleetSnapshot(hosts=(*FLEET.hosts, make_host("host-e", up=False)))
    text = explain(place(snapshot, make_request(), MEMORY_ONLY))
    assert text.splitlines()[:4] == [
        "chosen host: host-a",
        "alternates: host-c, host-d",
        "ranking:",
        "  1. host-a score=1.000 memory_mib=1.000",
    ]
    assert text.splitlines()[-2:] == ["rejected:", "  host-e: down"]
    refusal = explain(place(snapshot, make_request(memory=9000), MEMORY_ONLY))
    assert refusal.splitlines()[0] == "no valid host for vm-1: capacity:memory 5, host_down 1"
    assert "  host-e: down, memory short by 808 MiB at ratio 1.0" in refusal.splitlines()


def test_empty_fleet_is_refused() -> None:
    result = refused(place(FleetSnapshot(hosts=()), make_request()))
    assert result.reasons == ()
    assert result.headline() == "no valid host for vm-1: empty fleet"
