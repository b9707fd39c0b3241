"""Pure parts of placement operations: setting precedence, limits, drift notes, --limit parsing."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import pytest
from builders import host_record

from common.errors import InvalidRequest
from common.messages import placement as msg
from common.messages.vm import DesiredPower, Lifecycle, PowerState, VmStatus
from controller.cli.cmd_placement import parse_limit
from controller.config import ControllerConfig
from controller.db.repository import VmRecord
from controller.fleet import inventories, inventory_sources
from controller.placement_ops import drift_notes, reported_usage
from controller.scheduler.model import ResourceClass

host = functools.partial(
    host_record, cpus=16, memory_mib=65536, memory_free_mib=60000, disk_free_gib=400, generation=0
)


def vm(name: str, uuid: str, **over: Any) -> VmRecord:
    base: dict[str, Any] = {
        "uuid": uuid,
        "name": name,
        "host": "h1",
        "status": Lifecycle.ACTIVE,
        "task": None,
        "desired_power": DesiredPower.RUNNING,
        "power_state": PowerState.RUNNING,
        "vcpus": 2,
        "max_vcpus": 2,
        "memory_mib": 1024,
        "max_memory_mib": 1024,
        "disk_gib": 10,
        "autostart": False,
        "persistent": True,
        "cpu_time_ns": 0,
        "spec": None,
        "idempotency_key": None,
        "last_error": None,
        "created_at": 1.0,
        "updated_at": 1.0,
        "reported_at": None,
    }
    base.update(over)
    return VmRecord(**base)


def status(name: str, uuid: str, *, vcpus: int = 2, memory: int = 1024, managed: bool = True) -> VmStatus:
    return VmStatus(
        uuid=uuid,
        name=name,
        state=PowerState.RUNNING,
        vcpus=vcpus,
        max_vcpus=vcpus,
        memory_mib=memory,
        max_memory_mib=memory,
        managed=managed,
    )


CONFIG = ControllerConfig()


def test_host_setting_beats_group_beats_fleet() -> None:
    fleet_only = inventories(host(), CONFIG)
    assert fleet_only[ResourceClass.VCPU].allocation_ratio == 4.0
    assert fleet_only[ResourceClass.MEMORY_MIB].reserved == 512

    grouped = host(group_name="dense", group_settings={"cpu_ratio": 8.0, "reserved_memory_mib": 2048})
    inv = inventories(grouped, CONFIG)
    assert inv[ResourceClass.VCPU].allocation_ratio == 8.0
    assert inv[ResourceClass.VCPU].capacity == 128
    assert inv[ResourceClass.MEMORY_MIB].reserved == 2048
    assert inventory_sources(grouped, CONFIG)[ResourceClass.VCPU] == "group:dense"
    assert inventory_sources(grouped, CONFIG)[ResourceClass.DISK_GIB] == "fleet"

    own = replace(grouped, cpu_ratio=2.0)
    assert inventories(own, CONFIG)[ResourceClass.VCPU].capacity == 32
    assert inventory_sources(own, CONFIG)[ResourceClass.VCPU] == "host"


def test_xen_never_overcommits_memory_even_when_a_group_says_so() -> None:
    xen = host(hypervisor_type="Xen", group_name="g", group_settings={"ram_ratio": 1.5}, ram_ratio=2.0)
    assert inventories(xen, CONFIG)[ResourceClass.MEMORY_MIB].allocation_ratio == 1.0


def test_unit_limits_come_from_the_host_overrides() -> None:
    limited = host(inventory_overrides={"MEMORY_MIB": {"min_unit": 256, "max_unit": 8192, "step_size": 256}})
    inv = inventories(limited, CONFIG)[ResourceClass.MEMORY_MIB]
    assert (inv.min_unit, inv.max_unit, inv.step_size) == (256, 8192, 256)
    assert inventories(limited, CONFIG)[ResourceClass.VCPU].step_size == 1


def test_drift_names_unmanaged_missing_and_oversized_vms() -> None:
    record = host(
        reported_vms=(
            status("known", "u1"),
            status("handmade", "u9", vcpus=4, memory=4096, managed=False),
            status("grown", "u2", vcpus=4, memory=1024),
        )
    )
    vms = [vm("known", "u1"), vm("grown", "u2"), vm("gone", "u3"), vm("new", "u4", status=Lifecycle.BUILDING)]
    notes = drift_notes(record, vms)
    assert notes == [
        "unmanaged domain handmade (running, 4 vCPU, 4096 MiB) is not claimed by virtfleet",
        "VM grown uses 4 vCPU / 1024 MiB, claimed 2 vCPU / 1024 MiB",
        "VM gone is claimed here but the host does not report it",
    ]


def test_a_vm_changed_after_the_last_full_report_is_not_judged_by_it() -> None:
    # Created or moved here, or resized (here: ballooned to 512 MiB, its claim with it) after the
    # report was written: deltas and replies tell its state, the host's next full report lists it.
    record = host(last_report=100.0, reported_vms=(status("shrunk", "u3", memory=1024),))
    shrunk = vm("shrunk", "u3", memory_mib=512)
    assert (
        drift_notes(
            record, [vm("new", "u1", updated_at=100.5), vm("shrunk", "u3", memory_mib=512, updated_at=100.5)]
        )
        == []
    )
    assert drift_notes(record, [vm("old", "u2", updated_at=99.0), shrunk]) == [
        "VM old is claimed here but the host does not report it",
        "VM shrunk uses 2 vCPU / 1024 MiB, claimed 2 vCPU / 512 MiB",
    ]


def test_reported_use_counts_what_the_host_said_since_its_last_full_report() -> None:
    record = host(
        last_report=100.0,
        reported_vms=(
            status("old", "u1", vcpus=2, memory=1024),
            status("resized", "u2", vcpus=4, memory=4096),
        ),
    )
    vms = [
        vm("old", "u1", updated_at=99.0),  # as the report said
        vm("resized", "u2", vcpus=1, memory_mib=512, updated_at=101.0),  # setvcpus + setmem since
        vm("new", "u3", vcpus=2, memory_mib=2048, updated_at=102.0),  # created since
        vm("stopped", "u4", power_state=PowerState.SHUTOFF, updated_at=103.0),  # holds nothing
        vm("building", "u5", status=Lifecycle.BUILDING, updated_at=104.0),  # not on the host yet
    ]
    used = reported_usage(record, vms)
    assert (used["VCPU"], used["MEMORY_MIB"]) == (2 + 1 + 2, 1024 + 512 + 2048)
    # The report alone, as before any command: what it listed.
    assert (reported_usage(record)["VCPU"], reported_usage(record)["MEMORY_MIB"]) == (6, 5120)


def test_no_drift_when_report_and_claims_agree() -> None:
    assert drift_notes(host(reported_vms=(status("a", "u1"),)), [vm("a", "u1")]) == []


def test_parse_limit() -> None:
    assert parse_limit("memory_mib:min=256,max=8192,step=256") == msg.Limits("MEMORY_MIB", 256, 8192, 256)
    assert parse_limit("VCPU:max=8") == msg.Limits("VCPU", None, 8, None)
    for bad in ("MEMORY_MIB", "MEMORY_MIB:", "MEMORY_MIB:size=3", "MEMORY_MIB:min=x", "FOO:min=1"):
        with pytest.raises(InvalidRequest):
            parse_limit(bad)
    with pytest.raises(InvalidRequest, match="below min_unit"):
        parse_limit("VCPU:min=4,max=2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpu_ratio": 0.0}, "cpu ratio must be a positive number"),
        ({"ram_ratio": float("nan")}, "ram ratio must be a positive number"),
        ({"reserved_memory_mib": -1}, "reserved memory mib must be zero or more"),
        ({"reset": ("bogus",)}, "cannot reset bogus"),
        ({"group": "bad name"}, "invalid host group"),
    ],
)
def test_host_set_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        msg.HostSet(host="h1", **kwargs)


def test_server_group_validation() -> None:
    assert msg.ServerGroupCreate("web", "anti-affinity", 2).max_per_host == 2
    with pytest.raises(InvalidRequest, match="policy must be one of"):
        msg.ServerGroupCreate("web", "spread-out")
    with pytest.raises(InvalidRequest, match="at least 1"):
        msg.ServerGroupCreate("web", "anti-affinity", 0)
