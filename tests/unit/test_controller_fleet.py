"""Stored host records -> scheduler model and API views (controller/fleet.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from builders import host_record

from common.messages.api import RejectionView, ResourceView
from common.messages.vm import DesiredPower, Lifecycle, PowerState
from controller import fleet
from controller.config import ControllerConfig, Overcommit
from controller.db.repository import HostRecord, VmRecord
from controller.scheduler.model import (
    HostRejection,
    Inventory,
    Placement,
    Refusal,
    ResourceClass,
    Rule,
    Strategy,
)
from controller.scheduler.place import place

VCPU, MEM, DISK = ResourceClass.VCPU, ResourceClass.MEMORY_MIB, ResourceClass.DISK_GIB
NOW = 1_764_111_111.0
CONFIG = ControllerConfig()  # down_after_s 30, cpu 4.0, ram 1.0, disk 1.0, reserved memory 512


def host(host_id: str = "h1", **changes: Any) -> HostRecord:
    ours = {
        "hostname": f"{host_id}.example",
        "hypervisor_version": "8.2.0",
        "memory_free_mib": 12000,
        "disk_free_gib": 400,
        "networks": ("default",),
        "bridges": ("br0",),
        "generation": 7,
        "last_heartbeat": NOW - 5,
        "last_report": NOW - 5,
    }
    return host_record(host_id, **(ours | changes))


def test_helper_sets_every_host_record_field() -> None:
    names = {f.name for f in dataclasses.fields(HostRecord)}
    assert set(dataclasses.asdict(host())) == names


# ------------------------------------------------------------------ liveness


def test_host_exactly_down_after_old_is_up() -> None:
    record = host(last_heartbeat=1000.0)
    assert fleet.host_is_up(record, 1030.0, 30.0) is True
    assert fleet.down_since(record, 1030.0, 30.0) is None


def test_host_a_hair_older_is_down() -> None:
    record = host(last_heartbeat=1000.0)
    now = math.nextafter(1030.0, math.inf)
    assert fleet.host_is_up(record, now, 30.0) is False
    assert fleet.down_since(record, now, 30.0) == 1000.0


def test_fresh_heartbeat_is_up() -> None:
    record = host(last_heartbeat=1000.0)
    assert fleet.host_is_up(record, 1000.0, 30.0) is True
    assert fleet.host_is_up(record, 1010.0, 30.0) is True


def test_heartbeat_from_the_future_is_up() -> None:
    # Clock skew between controllers must not mark a live host down.
    assert fleet.host_is_up(host(last_heartbeat=1100.0), 1000.0, 30.0) is True


def test_never_heard_of_is_down_without_since() -> None:
    record = host(last_heartbeat=None)
    assert fleet.host_is_up(record, NOW, 30.0) is False
    assert fleet.down_since(record, NOW, 30.0) is None


def test_host_state_liveness_follows_config() -> None:
    record = host(last_heartbeat=NOW - 31)
    assert fleet.host_state(record, CONFIG, NOW).up is False
    assert fleet.host_state(record, CONFIG, NOW).down_since == NOW - 31
    relaxed = dataclasses.replace(CONFIG, down_after_s=60.0)
    assert fleet.host_state(record, relaxed, NOW).up is True
    assert fleet.host_state(record, relaxed, NOW).down_since is None


# ------------------------------------------------------------------ inventories


def test_inventories_apply_fleet_defaults() -> None:
    inv = fleet.inventories(host(), CONFIG)
    assert inv == {
        VCPU: Inventory(total=8, reserved=0, allocation_ratio=4.0),
        MEM: Inventory(total=16384, reserved=512, allocation_ratio=1.0),
        DISK: Inventory(total=500, reserved=0, allocation_ratio=1.0),
    }
    assert inv[VCPU].capacity == 32
    assert inv[MEM].capacity == 15872
    assert inv[DISK].capacity == 500


def test_inventories_use_configured_fleet_defaults() -> None:
    config = ControllerConfig(
        overcommit=Overcommit(
            cpu_ratio=2.0,
            ram_ratio=1.5,
            disk_ratio=3.0,
            reserved_memory_mib=1024,
            reserved_cpus=1,
            reserved_disk_gib=20,
        )
    )
    inv = fleet.inventories(host(), config)
    assert (inv[VCPU].reserved, inv[VCPU].allocation_ratio, inv[VCPU].capacity) == (1, 2.0, 14)
    assert (inv[MEM].reserved, inv[MEM].allocation_ratio, inv[MEM].capacity) == (1024, 1.5, 23040)
    assert (inv[DISK].reserved, inv[DISK].allocation_ratio, inv[DISK].capacity) == (20, 3.0, 1440)


def test_per_host_overrides_beat_fleet_defaults() -> None:
    record = host(
        cpu_ratio=16.0,
        ram_ratio=1.25,
        disk_ratio=2.0,
        reserved_memory_mib=2048,
        reserved_cpus=2,
        reserved_disk_gib=50,
    )
    inv = fleet.inventories(record, CONFIG)
    assert inv[VCPU] == Inventory(total=8, reserved=2, allocation_ratio=16.0)
    assert inv[VCPU].capacity == 96
    assert inv[MEM] == Inventory(total=16384, reserved=2048, allocation_ratio=1.25)
    assert inv[MEM].capacity == int((16384 - 2048) * 1.25)
    assert inv[DISK] == Inventory(total=500, reserved=50, allocation_ratio=2.0)
    assert inv[DISK].capacity == 900


def test_zero_overrides_are_overrides_not_unset() -> None:
    inv = fleet.inventories(host(reserved_memory_mib=0), CONFIG)
    assert inv[MEM].reserved == 0
    assert inv[MEM].capacity == 16384


def test_reserved_amounts_clamp_at_total() -> None:
    record = host(cpus=2, memory_mib=256, disk_gib=10, reserved_cpus=4, reserved_disk_gib=11)
    inv = fleet.inventories(record, CONFIG)  # fleet reserves 512 MiB of memory
    assert inv[MEM].reserved == 256
    assert inv[MEM].capacity == 0
    assert inv[VCPU].reserved == 2
    assert inv[VCPU].capacity == 0
    assert inv[DISK].reserved == 10
    assert inv[DISK].capacity == 0


@pytest.mark.parametrize("hv", ["xen", "Xen", "XEN"])
def test_xen_forces_ram_ratio_one_even_with_override(hv: str) -> None:
    inv = fleet.inventories(host(hypervisor_type=hv, ram_ratio=1.5, cpu_ratio=8.0), CONFIG)
    assert inv[MEM].allocation_ratio == 1.0
    assert inv[MEM].capacity == 16384 - 512
    assert inv[VCPU].allocation_ratio == 8.0  # only memory is pinned


def test_xen_forces_ram_ratio_one_over_fleet_default() -> None:
    config = ControllerConfig(overcommit=Overcommit(ram_ratio=2.0))
    assert fleet.inventories(host(hypervisor_type="Xen"), config)[MEM].allocation_ratio == 1.0
    assert fleet.inventories(host(hypervisor_type="QEMU"), config)[MEM].allocation_ratio == 2.0


def test_kvm_ram_override_is_kept() -> None:
    assert fleet.inventories(host(ram_ratio=1.5), CONFIG)[MEM].allocation_ratio == 1.5


# ------------------------------------------------------------------ host state and views


def test_host_state_fields() -> None:
    record = host(
        hypervisor_type="QEMU",
        used={"VCPU": 4, "MEMORY_MIB": 4096, "DISK_GIB": 100, "FPGA": 1},
        vm_count=2,
        max_vms=10,
        networks=("default", "ovs"),
    )
    state = fleet.host_state(record, CONFIG, NOW)
    assert state.host_id == "h1"
    assert dict(state.used) == {VCPU: 4, MEM: 4096, DISK: 100}  # unknown class dropped
    assert dict(state.free) == {VCPU: 28, MEM: 15872 - 4096, DISK: 400}
    assert state.hypervisor_type == "qemu"
    assert state.networks == frozenset({"default", "ovs"})
    assert state.bridges == frozenset({"br0"})
    assert state.generation == 7
    assert state.vm_count == 2
    assert state.max_vms == 10
    assert state.up is True
    assert state.accepting is True


@pytest.mark.parametrize(
    ("changes", "accepting"),
    [
        ({}, True),
        ({"enabled": False}, False),
        ({"maintenance": True}, False),
        ({"last_heartbeat": None}, False),
        ({"max_vms": 2, "vm_count": 2}, False),
        ({"max_vms": 3, "vm_count": 2}, True),
    ],
)
def test_host_state_accepting(changes: dict[str, Any], accepting: bool) -> None:
    assert fleet.host_state(host(**changes), CONFIG, NOW).accepting is accepting


def test_resource_views_numbers() -> None:
    record = host(
        cpus=8, memory_mib=16384, disk_gib=500, ram_ratio=1.5, used={"VCPU": 10, "MEMORY_MIB": 30000}
    )
    views = fleet.resource_views(record, CONFIG)
    assert views == (
        ResourceView(
            resource="VCPU", total=8, reserved=0, allocation_ratio=4.0, capacity=32, used=10, free=22
        ),
        ResourceView(
            resource="MEMORY_MIB",
            total=16384,
            reserved=512,
            allocation_ratio=1.5,
            capacity=int((16384 - 512) * 1.5),
            used=30000,
            free=int((16384 - 512) * 1.5) - 30000,
        ),
        ResourceView(
            resource="DISK_GIB", total=500, reserved=0, allocation_ratio=1.0, capacity=500, used=0, free=500
        ),
    )
    assert views[1].capacity == 23808
    assert views[1].free == -6192


def test_resource_views_capacity_floors() -> None:
    views = fleet.resource_views(host(cpus=3, cpu_ratio=1.5), CONFIG)
    assert views[0].capacity == 4  # int(4.5)
    assert views[0].free == 4


def test_resource_view_free_goes_negative_when_ratio_lowered() -> None:
    views = {v.resource: v for v in fleet.resource_views(host(cpu_ratio=1.0, used={"VCPU": 12}), CONFIG)}
    assert views["VCPU"].capacity == 8
    assert views["VCPU"].free == -4


def test_host_view_summary_and_detail() -> None:
    record = host(last_heartbeat=NOW - 100, vm_count=1)
    summary = fleet.host_view(record, CONFIG, NOW, vms=["web"])
    assert summary.status == "down"
    assert summary.down_since == NOW - 100
    assert summary.resources == ()
    assert summary.networks == ()
    assert summary.vms == ()
    assert summary.hypervisor_type == "QEMU"
    detail = fleet.host_view(
        dataclasses.replace(record, last_heartbeat=NOW), CONFIG, NOW, vms=["web"], detail=True
    )
    assert detail.status == "up"
    assert detail.down_since is None
    assert detail.resources == fleet.resource_views(record, CONFIG)
    assert detail.networks == ("default",)
    assert detail.bridges == ("br0",)
    assert detail.vms == ("web",)


def test_policy_from_config() -> None:
    pol = fleet.policy(ControllerConfig(strategy="pack", n_plus_one=True, max_attempts=4))
    assert pol.strategy is Strategy.PACK
    assert pol.n_plus_one is True
    assert pol.max_alternates == 3
    assert fleet.policy(ControllerConfig(max_attempts=1)).max_alternates == 0


def test_amounts_and_placement_request() -> None:
    assert fleet.amounts(2, 1024, 10) == {VCPU: 2, MEM: 1024, DISK: 10}
    req = fleet.placement_request(
        "web", fleet.amounts(2, 1024, 0), needs_hw_virt=True, force_host="h1", exclude=["h2"]
    )
    assert dict(req.resources) == {VCPU: 2, MEM: 1024}
    assert req.needs_hw_virt is True
    assert req.force_host == "h1"
    assert req.exclude_hosts == frozenset({"h2"})


def test_rejection_view() -> None:
    rejection = HostRejection(host_id="h1", rule=Rule.CAPACITY, message="memory short by 1 MiB at ratio 1.0")
    assert fleet.rejection_view(rejection) == RejectionView(
        host="h1", rule="capacity", message="memory short by 1 MiB at ratio 1.0"
    )


def test_vm_view_copies_fields() -> None:
    record = VmRecord(
        uuid="u",
        name="web",
        host="h1",
        status=Lifecycle.ACTIVE,
        task=None,
        desired_power=DesiredPower.RUNNING,
        power_state=PowerState.RUNNING,
        vcpus=2,
        max_vcpus=4,
        memory_mib=1024,
        max_memory_mib=2048,
        disk_gib=10,
        autostart=True,
        persistent=True,
        cpu_time_ns=5,
        spec=None,
        idempotency_key=None,
        last_error="old",
        created_at=1.0,
        updated_at=2.0,
        reported_at=None,
    )
    view = fleet.vm_view(record)
    assert (view.uuid, view.name, view.host, view.status, view.power_state) == (
        "u",
        "web",
        "h1",
        "active",
        "running",
    )
    assert (view.vcpus, view.max_vcpus, view.memory_mib, view.max_memory_mib, view.disk_gib) == (
        2,
        4,
        1024,
        2048,
        10,
    )
    assert (view.cpu_time_ns, view.created_at, view.updated_at, view.last_error) == (5, 1.0, 2.0, "old")


# ------------------------------------------------------------------ snapshot -> place()


def test_snapshot_then_place_refuses_oversized_vm() -> None:
    records = [host("h1", used={"MEMORY_MIB": 8192}), host("h2", memory_mib=8192)]
    snap = fleet.snapshot(records, CONFIG, NOW)
    assert snap.now == NOW
    assert [h.host_id for h in snap.hosts] == ["h1", "h2"]
    request = fleet.placement_request("big", fleet.amounts(2, 12000, 10))
    result = place(snap, request, fleet.policy(CONFIG))
    assert isinstance(result, Refusal)
    # h1: 16384 - 512 - 8192 = 7680 free; h2: 8192 - 512 = 7680 free.
    assert (
        result.summary()
        == "h1: memory short by 4320 MiB at ratio 1.0; h2: memory short by 4320 MiB at ratio 1.0"
    )
    assert {(r.host_id, r.rule, r.resource, r.requested, r.free, r.short_by) for r in result.reasons} == {
        ("h1", Rule.CAPACITY, MEM, 12000, 7680, 4320),
        ("h2", Rule.CAPACITY, MEM, 12000, 7680, 4320),
    }
    assert result.headline() == "no valid host for big: capacity:memory 2"


def test_snapshot_then_place_explains_down_host_and_uses_override_ratio() -> None:
    records = [
        host("down", last_heartbeat=NOW - 31),
        host("small", memory_mib=4096, ram_ratio=2.0),
        host("xen", hypervisor_type="Xen", memory_mib=4096, ram_ratio=2.0),
    ]
    snap = fleet.snapshot(records, CONFIG, NOW)
    result = place(snap, fleet.placement_request("web", fleet.amounts(1, 6000, 1)), fleet.policy(CONFIG))
    assert isinstance(result, Placement)
    assert result.host_id == "small"  # (4096 - 512) * 2.0 = 7168 MiB capacity
    rejections = {(r.host_id, r.rule) for r in result.rejections}
    assert rejections == {("down", Rule.HOST_DOWN), ("xen", Rule.CAPACITY)}
    xen = next(r for r in result.rejections if r.host_id == "xen")
    assert xen.message == "memory short by 2416 MiB at ratio 1.0"


def test_snapshot_then_place_fits_exactly_at_capacity() -> None:
    snap = fleet.snapshot([host("h1", memory_mib=2048)], CONFIG, NOW)
    fits = place(snap, fleet.placement_request("a", fleet.amounts(1, 1536, 1)))
    assert isinstance(fits, Placement)
    assert fits.host_id == "h1"
    short = place(snap, fleet.placement_request("b", fleet.amounts(1, 1537, 1)))
    assert isinstance(short, Refusal)
    assert short.summary() == "h1: memory short by 1 MiB at ratio 1.0"


def test_empty_fleet_refusal() -> None:
    result = place(fleet.snapshot([], CONFIG, NOW), fleet.placement_request("a", fleet.amounts(1, 1, 1)))
    assert isinstance(result, Refusal)
    assert result.summary() == "no hosts in the fleet"
