"""Every rule's rejection: the human message and the structured fields."""

from __future__ import annotations

from typing import Any

import pytest

from controller.scheduler import (
    FleetSnapshot,
    HostRejection,
    HostState,
    Inventory,
    PlacementRequest,
    Refusal,
    ResourceClass,
    Rule,
    ServerGroup,
    place,
)
from controller.scheduler.filters import build_context, check_resource, host_rejections
from controller.scheduler.model import GroupPolicy

R = ResourceClass
NOW = 1_714_565_350.0  # 2024-05-01 12:09:10 UTC
DOWN_AT = 1_714_565_050.0  # 2024-05-01 12:04:10 UTC


def make_host(host_id: str = "host-1", **overrides: Any) -> HostState:
    """A roomy healthy KVM host: 8 cores at 4.0, 8 GiB (512 reserved), 100 GiB disk."""
    fields: dict[str, Any] = {
        "host_id": host_id,
        "inventories": {
            R.VCPU: Inventory(8, 0, 4.0),
            R.MEMORY_MIB: Inventory(8192, 512, 1.0),
            R.DISK_GIB: Inventory(100),
        },
        "networks": frozenset({"default"}),
        "bridges": frozenset({"br0"}),
    }
    fields.update(overrides)
    return HostState(**fields)


def make_request(**overrides: Any) -> PlacementRequest:
    fields: dict[str, Any] = {
        "vm_name": "vm-1",
        "resources": {R.VCPU: 2, R.MEMORY_MIB: 2048, R.DISK_GIB: 10},
    }
    fields.update(overrides)
    return PlacementRequest(**fields)


def rejections_of(
    host: HostState, request: PlacementRequest, groups: tuple[ServerGroup, ...] = ()
) -> list[HostRejection]:
    ctx = build_context(FleetSnapshot(hosts=(host,), server_groups=groups, now=NOW), request)
    return host_rejections(host, ctx)


def only(host: HostState, request: PlacementRequest, groups: tuple[ServerGroup, ...] = ()) -> HostRejection:
    found = rejections_of(host, request, groups)
    assert len(found) == 1, found
    return found[0]


def test_healthy_host_passes_everything() -> None:
    assert rejections_of(make_host(), make_request(networks=frozenset({"default"}))) == []


def test_memory_shortage_message_and_fields() -> None:
    host = make_host(used={R.MEMORY_MIB: 6656})  # capacity 7680, free 1024
    rejection = only(host, make_request(resources={R.MEMORY_MIB: 3072}))
    assert rejection.message == "memory short by 2048 MiB at ratio 1.0"
    assert rejection.rule == Rule.CAPACITY
    assert str(rejection.rule) == "capacity"  # the stable identifier
    assert (rejection.resource, rejection.requested, rejection.free, rejection.short_by, rejection.ratio) == (
        R.MEMORY_MIB,
        3072,
        1024,
        2048,
        1.0,
    )


def test_vcpu_shortage_reports_ratio() -> None:
    host = make_host(used={R.VCPU: 31})  # capacity 32
    rejection = only(host, make_request(resources={R.VCPU: 4}))
    assert rejection.message == "vcpu short by 3 vCPU at ratio 4.0"
    assert (rejection.free, rejection.short_by, rejection.ratio) == (1, 3, 4.0)


def test_exact_fit_is_accepted_and_one_more_is_not() -> None:
    host = make_host(used={R.MEMORY_MIB: 5632})  # free 2048
    assert rejections_of(host, make_request(resources={R.MEMORY_MIB: 2048})) == []
    assert only(host, make_request(resources={R.MEMORY_MIB: 2049})).short_by == 1


def test_overused_host_reports_free_zero_and_full_shortage() -> None:
    host = make_host(used={R.MEMORY_MIB: 8000})  # 320 MiB above capacity after a ratio change
    rejection = only(host, make_request(resources={R.MEMORY_MIB: 100}))
    assert (rejection.free, rejection.short_by) == (0, 420)
    assert rejection.message == "memory short by 420 MiB at ratio 1.0"


def test_missing_inventory_is_a_rejection() -> None:
    host = make_host(inventories={R.VCPU: Inventory(8, 0, 4.0), R.MEMORY_MIB: Inventory(8192)})
    rejection = only(host, make_request(resources={R.DISK_GIB: 20}))
    assert rejection.message == "no disk inventory (requested 20 GiB)"
    assert (rejection.rule, rejection.resource, rejection.free, rejection.short_by) == (
        Rule.CAPACITY,
        R.DISK_GIB,
        0,
        20,
    )


def test_zero_amount_of_a_missing_resource_is_fine() -> None:
    host = make_host(inventories={R.MEMORY_MIB: Inventory(8192)})
    assert rejections_of(host, make_request(resources={R.MEMORY_MIB: 512, R.DISK_GIB: 0})) == []


@pytest.mark.parametrize(
    ("inventory", "amount", "message"),
    [
        (Inventory(8192, min_unit=256), 128, "memory request 128 MiB is below min_unit 256"),
        (Inventory(8192, step_size=256), 1000, "memory request 1000 MiB is not a multiple of step_size 256"),
        (Inventory(8192, max_unit=2048), 4096, "memory request 4096 MiB is above max_unit 2048"),
    ],
)
def test_unit_rules(inventory: Inventory, amount: int, message: str) -> None:
    host = make_host(inventories={R.MEMORY_MIB: inventory})
    rejection = only(host, make_request(resources={R.MEMORY_MIB: amount}))
    assert rejection.message == message
    assert rejection.rule == Rule.CAPACITY
    assert rejection.short_by is None


def test_unit_rules_accept_conforming_amounts() -> None:
    inventory = Inventory(8192, min_unit=256, max_unit=4096, step_size=256)
    host = make_host(inventories={R.MEMORY_MIB: inventory})
    for amount in (256, 512, 4096):
        assert check_resource(host, R.MEMORY_MIB, amount) is None


def test_down_host_names_the_time() -> None:
    rejection = only(make_host(up=False, down_since=DOWN_AT), make_request())
    assert rejection.message == "down since 12:04:10 UTC"
    assert (rejection.rule, rejection.since) == (Rule.HOST_DOWN, DOWN_AT)
    assert only(make_host(up=False), make_request()).message == "down"


@pytest.mark.parametrize(
    ("overrides", "rule", "message"),
    [
        ({"enabled": False}, Rule.DISABLED, "disabled by an operator"),
        ({"maintenance": True}, Rule.MAINTENANCE, "in maintenance"),
        ({"enabled": False, "state_reason": "PSU"}, Rule.DISABLED, "disabled by an operator: PSU"),
        ({"maintenance": True, "state_reason": "BIOS 2.1"}, Rule.MAINTENANCE, "in maintenance: BIOS 2.1"),
        ({"vm_count": 5, "max_vms": 5}, Rule.MAX_VMS, "already runs 5 VMs (max 5)"),
        ({"has_hw_virt": False}, Rule.HW_VIRT, "no hardware virtualisation (VT-x/AMD-V absent)"),
        ({"hypervisor_type": "qemu"}, Rule.HW_VIRT, "no hardware virtualisation (hypervisor qemu)"),
        ({"networks": frozenset()}, Rule.NETWORK, "missing networks default,prod"),
        ({"networks": frozenset({"default"})}, Rule.NETWORK, "missing network prod"),
        ({"bridges": frozenset()}, Rule.BRIDGE, "missing bridge br0"),
    ],
)
def test_host_rules(overrides: dict[str, Any], rule: Rule, message: str) -> None:
    request = make_request(
        needs_hw_virt=True, networks=frozenset({"default", "prod"}), bridges=frozenset({"br0"})
    )
    host = make_host(**({"networks": frozenset({"default", "prod"})} | overrides))
    rejection = only(host, request)
    assert (rejection.rule, rejection.message) == (rule, message)


def test_hw_virt_accepts_kvm_in_any_case_and_ignores_unneeded() -> None:
    assert rejections_of(make_host(hypervisor_type="KVM"), make_request(needs_hw_virt=True)) == []
    assert rejections_of(make_host(hypervisor_type="test", has_hw_virt=False), make_request()) == []


def test_network_rejection_lists_missing_names() -> None:
    rejection = only(make_host(networks=frozenset()), make_request(networks=frozenset({"b", "a"})))
    assert rejection.missing == ("a", "b")


def test_max_vms_fields() -> None:
    rejection = only(make_host(vm_count=6, max_vms=5), make_request())
    assert (rejection.requested, rejection.free, rejection.short_by) == (1, 0, 2)


def test_excluded_and_forced() -> None:
    excluded = only(make_host(), make_request(exclude_hosts=frozenset({"host-1"})))
    assert (excluded.rule, excluded.message) == (Rule.EXCLUDED, "already failed this request (reschedule)")
    forced = only(make_host(), make_request(force_host="host-2"))
    assert (forced.rule, forced.message) == (Rule.FORCED_HOST, "not the forced host host-2")
    assert rejections_of(make_host(), make_request(force_host="host-1")) == []


def test_hard_affinity() -> None:
    group = ServerGroup(name="web", policy=GroupPolicy.AFFINITY, members={"host-9": 2})
    rejection = only(make_host(), make_request(group="web"), (group,))
    assert (rejection.rule, rejection.message) == (
        Rule.AFFINITY,
        "server group web (affinity) runs on host-9 only",
    )
    empty = ServerGroup(name="web", policy=GroupPolicy.AFFINITY)
    assert rejections_of(make_host(), make_request(group="web"), (empty,)) == []
    here = ServerGroup(name="web", policy=GroupPolicy.AFFINITY, members={"host-1": 1})
    assert rejections_of(make_host(), make_request(group="web"), (here,)) == []


def test_hard_anti_affinity_respects_max_per_host() -> None:
    group = ServerGroup(name="db", policy=GroupPolicy.ANTI_AFFINITY, members={"host-1": 1})
    rejection = only(make_host(), make_request(group="db"), (group,))
    assert rejection.rule == Rule.ANTI_AFFINITY
    assert rejection.message == "server group db (anti-affinity) already has 1 VM(s) here (max 1 per host)"
    assert rejection.short_by == 1
    roomier = ServerGroup(name="db", policy=GroupPolicy.ANTI_AFFINITY, max_per_host=2, members={"host-1": 1})
    assert rejections_of(make_host(), make_request(group="db"), (roomier,)) == []


def test_soft_groups_never_filter() -> None:
    for policy in (GroupPolicy.SOFT_AFFINITY, GroupPolicy.SOFT_ANTI_AFFINITY):
        group = ServerGroup(name="g", policy=policy, members={"host-1": 5, "host-2": 1})
        assert rejections_of(make_host(), make_request(group="g"), (group,)) == []


def pinned_host(free: frozenset[int], total: int = 8, used: int = 0) -> HostState:
    return make_host(
        inventories={R.PCPU: Inventory.for_class(R.PCPU, total), R.MEMORY_MIB: Inventory(8192)},
        used={R.PCPU: used},
        free_pcpus=free,
    )


def test_dedicated_cpus_by_inventory() -> None:
    rejection = only(pinned_host(frozenset(range(8)), used=6), make_request(resources={}, dedicated_cpus=4))
    assert rejection.message == "dedicated cpu short by 2 pCPU at ratio 1.0"
    assert (rejection.rule, rejection.resource, rejection.short_by) == (Rule.DEDICATED_CPUS, R.PCPU, 2)


def test_dedicated_cpus_by_free_set() -> None:
    rejection = only(pinned_host(frozenset({0, 1})), make_request(resources={}, dedicated_cpus=4))
    assert rejection.message == "only 2 free pinnable CPUs, need 4"
    assert (rejection.rule, rejection.requested, rejection.free, rejection.short_by) == (
        Rule.DEDICATED_CPUS,
        4,
        2,
        2,
    )


def test_dedicated_cpus_need_pcpu_inventory() -> None:
    rejection = only(make_host(free_pcpus=frozenset(range(8))), make_request(resources={}, dedicated_cpus=2))
    assert (rejection.rule, rejection.message) == (
        Rule.DEDICATED_CPUS,
        "no dedicated cpu inventory (requested 2 pCPU)",
    )


def test_hugepages() -> None:
    host = make_host(
        inventories={R.HUGEPAGES_2M: Inventory.for_class(R.HUGEPAGES_2M, 1024)}, used={R.HUGEPAGES_2M: 1000}
    )
    rejection = only(host, make_request(resources={R.HUGEPAGES_2M: 536}))
    assert rejection.message == "2M hugepages short by 512 pages at ratio 1.0"
    assert (rejection.rule, rejection.resource) == (Rule.HUGEPAGES, R.HUGEPAGES_2M)


def test_every_failing_rule_is_named() -> None:
    host = make_host(
        up=False,
        down_since=DOWN_AT,
        maintenance=True,
        networks=frozenset(),
        used={R.MEMORY_MIB: 7680, R.DISK_GIB: 95},
    )
    request = make_request(networks=frozenset({"default"}))
    rules = [r.rule for r in rejections_of(host, request)]
    assert rules == [Rule.HOST_DOWN, Rule.MAINTENANCE, Rule.NETWORK, Rule.CAPACITY, Rule.CAPACITY]
    resources = [r.resource for r in rejections_of(host, request) if r.rule == Rule.CAPACITY]
    assert resources == [R.DISK_GIB, R.MEMORY_MIB]


def test_refusal_summary_text() -> None:
    snapshot = FleetSnapshot(
        hosts=(
            make_host("host-3", used={R.MEMORY_MIB: 6656}),
            make_host("host-5", up=False, down_since=DOWN_AT),
        ),
        now=NOW,
    )
    result = place(snapshot, make_request(resources={R.MEMORY_MIB: 3072}))
    assert isinstance(result, Refusal)
    assert (
        result.summary() == "host-3: memory short by 2048 MiB at ratio 1.0; host-5: down since 12:04:10 UTC"
    )
    assert result.tally() == {"capacity:memory": 1, "host_down": 1}
    assert result.headline() == "no valid host for vm-1: capacity:memory 1, host_down 1"
    assert result.reasons[0].as_dict() == {
        "host": "host-3",
        "rule": "capacity",
        "message": "memory short by 2048 MiB at ratio 1.0",
        "resource": "MEMORY_MIB",
        "requested": 3072,
        "free": 1024,
        "short_by": 2048,
        "ratio": 1.0,
    }


def test_refusal_summary_joins_rules_and_truncates() -> None:
    hosts = tuple(make_host(f"host-{i}", enabled=False, maintenance=True) for i in range(4))
    result = place(FleetSnapshot(hosts=hosts, now=NOW), make_request())
    assert isinstance(result, Refusal)
    assert result.summary(max_hosts=2) == (
        "host-0: disabled by an operator, in maintenance; "
        "host-1: disabled by an operator, in maintenance; ... and 2 more hosts"
    )
    assert Refusal(()).summary() == "no hosts in the fleet"
