"""Capacity arithmetic and validation of the scheduler's model."""

from __future__ import annotations

import copy
import pickle

import pytest

from controller.scheduler import model

R = model.ResourceClass


@pytest.mark.parametrize(
    ("total", "reserved", "ratio", "capacity"),
    [
        (16, 0, 4.0, 64),
        (16, 2, 4.0, 56),
        (8192, 512, 1.0, 7680),
        (8192, 512, 1.5, 11520),
        (10, 0, 1.25, 12),  # 12.5 floors to 12, as placement does
        (3, 0, 0.5, 1),  # 1.5 floors to 1
        (100, 100, 2.0, 0),
        (100, 150, 2.0, 0),  # reserved above total: nothing, never negative
    ],
)
def test_capacity_is_floor_of_total_minus_reserved_times_ratio(
    total: int, reserved: int, ratio: float, capacity: int
) -> None:
    assert model.Inventory(total, reserved, ratio).capacity == capacity


def test_effective_max_unit_defaults_to_capacity() -> None:
    assert model.Inventory(16, 0, 4.0).effective_max_unit == 64
    assert model.Inventory(16, 0, 4.0, max_unit=8).effective_max_unit == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total": -1},
        {"total": 4, "reserved": -1},
        {"total": 4, "allocation_ratio": 0.0},
        {"total": 4, "allocation_ratio": -1.0},
        {"total": 4, "allocation_ratio": float("nan")},
        {"total": 4, "allocation_ratio": float("inf")},
        {"total": 4, "min_unit": 0},
        {"total": 4, "step_size": 0},
        {"total": 4, "min_unit": 4, "max_unit": 2},
    ],
)
def test_inventory_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        model.Inventory(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("resource", [R.PCPU, R.HUGEPAGES_2M, R.HUGEPAGES_1G])
def test_for_class_clamps_non_overcommittable_ratio_to_one(resource: model.ResourceClass) -> None:
    inventory = model.Inventory.for_class(resource, 8, allocation_ratio=16.0)
    assert inventory.allocation_ratio == 1.0
    assert inventory.capacity == 8


def test_for_class_keeps_ratio_of_shared_resources() -> None:
    assert model.Inventory.for_class(R.VCPU, 8, allocation_ratio=4.0).capacity == 32
    assert model.Inventory.for_class(R.MEMORY_MIB, 1024, reserved=512, allocation_ratio=1.5).capacity == 768


def test_host_refuses_overcommitted_pcpu_built_by_hand() -> None:
    with pytest.raises(ValueError, match="PCPU cannot be overcommitted"):
        model.HostState(host_id="h", inventories={R.PCPU: model.Inventory(8, 0, 2.0)})


def test_host_refuses_negative_usage() -> None:
    with pytest.raises(ValueError, match="negative usage"):
        model.HostState(host_id="h", inventories={R.VCPU: model.Inventory(8)}, used={R.VCPU: -1})


def test_host_derives_free_and_freezes_mappings() -> None:
    host = model.HostState(
        host_id="h",
        inventories={R.VCPU: model.Inventory(8, 0, 4.0), R.MEMORY_MIB: model.Inventory(4096, 512)},
        used={R.VCPU: 30, R.MEMORY_MIB: 4000},
    )
    assert host.free == {R.VCPU: 2, R.MEMORY_MIB: -416}  # overused after a ratio change
    assert isinstance(host.inventories, model.FrozenMap)
    assert isinstance(host.used, model.FrozenMap)
    assert hash(host) == hash(
        model.HostState(host_id="h", inventories=dict(host.inventories), used=dict(host.used))
    )


def test_host_accepting_summarises_host_only_rules() -> None:
    inv = {R.VCPU: model.Inventory(8)}
    assert model.HostState(host_id="h", inventories=inv).accepting
    assert not model.HostState(host_id="h", inventories=inv, up=False).accepting
    assert not model.HostState(host_id="h", inventories=inv, enabled=False).accepting
    assert not model.HostState(host_id="h", inventories=inv, maintenance=True).accepting
    assert not model.HostState(host_id="h", inventories=inv, vm_count=3, max_vms=3).accepting
    assert model.HostState(host_id="h", inventories=inv, vm_count=2, max_vms=3).accepting


def test_frozen_map_is_immutable_hashable_and_copyable() -> None:
    frozen = model.FrozenMap({"a": 1})
    with pytest.raises(TypeError):
        frozen["b"] = 2
    with pytest.raises(TypeError):
        frozen.update(b=2)
    with pytest.raises(TypeError):
        del frozen["a"]
    assert hash(frozen) == hash(model.FrozenMap([("a", 1)]))
    assert copy.deepcopy(frozen) == frozen
    assert pickle.loads(pickle.dumps(frozen)) == frozen
    assert isinstance(copy.copy(frozen), model.FrozenMap)


def test_request_dedicated_cpus_and_pcpu_resource_are_one_quantity() -> None:
    by_count = model.PlacementRequest(vm_name="v", resources={R.VCPU: 0, R.MEMORY_MIB: 512}, dedicated_cpus=4)
    assert by_count.resources == {R.MEMORY_MIB: 512, R.PCPU: 4}  # zero amounts dropped
    by_resource = model.PlacementRequest(vm_name="v", resources={R.PCPU: 2})
    assert by_resource.dedicated_cpus == 2
    with pytest.raises(ValueError, match="dedicated_cpus=4 but PCPU=2"):
        model.PlacementRequest(vm_name="v", resources={R.PCPU: 2}, dedicated_cpus=4)
    with pytest.raises(ValueError, match="negative amount"):
        model.PlacementRequest(vm_name="v", resources={R.VCPU: -1})


def test_policy_and_group_validation() -> None:
    with pytest.raises(ValueError):
        model.PlacementPolicy(max_alternates=-1)
    with pytest.raises(ValueError):
        model.ServerGroup(name="g", policy=model.GroupPolicy.ANTI_AFFINITY, max_per_host=0)
    group = model.ServerGroup(name="g", policy=model.GroupPolicy.AFFINITY, members={"a": 0, "b": 2})
    assert group.members == {"b": 2}


def test_snapshot_group_lookup() -> None:
    group = model.ServerGroup(name="g", policy=model.GroupPolicy.AFFINITY)
    snapshot = model.FleetSnapshot(hosts=(), server_groups=(group,))
    assert snapshot.group("g") is group
    with pytest.raises(model.UnknownServerGroupError, match="'nope'"):
        snapshot.group("nope")


def test_formatting_helpers() -> None:
    assert model.format_ratio(1.0) == "1.0"
    assert model.format_ratio(1.5) == "1.5"
    assert model.format_ratio(16.0) == "16.0"
    assert model.format_ratio(0.25) == "0.25"
    when = 1_714_565_050.0  # 2024-05-01 12:04:10 UTC
    assert model.format_timestamp(when, when + 60) == "12:04:10 UTC"
    assert model.format_timestamp(when, when + 86_400) == "2024-05-01 12:04:10 UTC"
    assert model.format_timestamp(when, None) == "2024-05-01 12:04:10 UTC"
