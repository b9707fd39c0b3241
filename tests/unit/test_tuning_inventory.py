"""Tuning facts -> scheduler inventories (controller/tuning_inventory.py, fleet.host_state)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from builders import host_record

from common.codec import to_wire
from common.errors import InvalidRequest
from common.messages.tuning import BlockDevice, HostTuningReport, HugepagePool, NumaCell
from controller import fleet, tuning_inventory
from controller.config import ControllerConfig
from controller.scheduler.model import Placement, Refusal, ResourceClass, Rule
from controller.scheduler.place import place

NOW = 1_764_111_111.0
CONFIG = ControllerConfig()
PCPU, VCPU = ResourceClass.PCPU, ResourceClass.VCPU
HP2M, HP1G = ResourceClass.HUGEPAGES_2M, ResourceClass.HUGEPAGES_1G


def report(**changes: Any) -> dict[str, Any]:
    """Plain tuning facts as stored: 8 CPUs in 2 cells, 2-7 dedicated, 0-1 shared."""
    base: dict[str, Any] = {
        "cells": (NumaCell(0, "0-3", 8192), NumaCell(1, "4-7", 8192)),
        "online_cpus": "0-7",
        "dedicated_cpus": "2-7",
        "shared_cpus": "0-1",
        "hugepages": (HugepagePool(2048, 512, 512, mounted=True), HugepagePool(1048576, 4, 4, mounted=True)),
        "default_hugepage_kib": 2048,
        "block_devices": (BlockDevice("vda", "none"),),
    }
    base.update(changes)
    return dict(to_wire(HostTuningReport(**base)))


host = functools.partial(
    host_record, hw_virt=False, numa_cells=2, last_heartbeat=NOW - 1, last_report=NOW - 1
)


def request(vcpus: int, memory: int = 1024, *, dedicated: bool = True, pages: int | None = None) -> Any:
    return fleet.placement_request(
        "vm",
        tuning_inventory.request_resources(vcpus, memory, 10, dedicated=dedicated, hugepage_size_kib=pages),
    )


# ------------------------------------------------------------------ pure pieces


def test_pcpu_allocation_keys_round_trip() -> None:
    keys = tuning_inventory.pcpu_allocations((5, 2))
    assert keys == {"PCPU:2": 1, "PCPU:5": 1}
    used = {"PCPU": 3, "PCPU:2": 1, "PCPU:5": 1, "PCPU:7": 0, "PCPU:x": 1, "VCPU": 4}
    assert tuning_inventory.claimed_pcpus(used) == {2, 5}


def test_request_resources() -> None:
    shared = tuning_inventory.request_resources(2, 2048, 10, dedicated=False, hugepage_size_kib=None)
    assert shared == {VCPU: 2, ResourceClass.MEMORY_MIB: 2048, ResourceClass.DISK_GIB: 10}
    pinned = tuning_inventory.request_resources(2, 2048, 10, dedicated=True, hugepage_size_kib=2048)
    assert pinned == {PCPU: 2, ResourceClass.MEMORY_MIB: 2048, ResourceClass.DISK_GIB: 10, HP2M: 1024}
    big = tuning_inventory.request_resources(1, 4096, 10, dedicated=False, hugepage_size_kib=1048576)
    assert big[HP1G] == 4


def test_hugepage_memory_must_be_whole_pages() -> None:
    assert tuning_inventory.hugepages_needed(512, 2048) == 256
    with pytest.raises(InvalidRequest) as err:
        tuning_inventory.hugepages_needed(1536, 1048576)
    assert "1G page size" in err.value.message
    with pytest.raises(InvalidRequest):
        tuning_inventory.hugepage_class(4)


def test_no_facts_change_nothing() -> None:
    record = host()
    state = fleet.host_state(record, CONFIG, NOW)
    assert set(state.inventories) == {VCPU, ResourceClass.MEMORY_MIB, ResourceClass.DISK_GIB}
    assert state.free_pcpus == frozenset()
    assert tuning_inventory.emulator_cpuset(record, dedicated=True) is None
    assert tuning_inventory.from_record(host(tuning="garbage")).known is False


def test_inventories_from_facts() -> None:
    record = host(tuning=report(), used={"PCPU": 2, "PCPU:2": 1, "PCPU:3": 1, "HUGEPAGES_2M": 100})
    state = fleet.host_state(record, CONFIG, NOW)
    inv = state.inventories
    assert inv[PCPU].total == 6 and inv[PCPU].allocation_ratio == 1.0
    assert state.free[PCPU] == 4
    assert state.free_pcpus == {4, 5, 6, 7}
    assert dict(state.pcpu_numa) == {2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    # shared VMs float over the 2 shared CPUs only, at the fleet's vCPU ratio
    assert inv[VCPU].total == 2 and inv[VCPU].capacity == 8
    # 512 pages, all free on the host, 100 claimed by VMs not yet started: nothing outside
    assert (inv[HP2M].total, inv[HP2M].reserved) == (512, 0)
    assert state.free[HP2M] == 412
    assert inv[HP1G].total == 4


def test_pages_used_outside_virtfleet_are_reserved() -> None:
    pools = (HugepagePool(2048, 512, 200, reserved=50, mounted=True),)  # 362 in use, 150 available
    record = host(tuning=report(hugepages=pools), used={"HUGEPAGES_2M": 300})
    inv = fleet.host_state(record, CONFIG, NOW).inventories[HP2M]
    assert inv.reserved == 62  # 362 in use, of which our VMs claim 300
    assert inv.capacity - 300 == 150


def test_unmounted_pools_offer_nothing() -> None:
    pools = (HugepagePool(2048, 512, 512, mounted=False),)
    state = fleet.host_state(host(tuning=report(hugepages=pools)), CONFIG, NOW)
    assert HP2M not in state.inventories


def test_emulator_cpuset() -> None:
    tuned = host(tuning=report())
    assert tuning_inventory.emulator_cpuset(tuned, dedicated=True) == "0-1"
    assert tuning_inventory.emulator_cpuset(tuned, dedicated=False) == "0-1"
    plain = host(tuning=report(dedicated_cpus="", shared_cpus="0-7"))
    assert tuning_inventory.emulator_cpuset(plain, dedicated=False) is None  # no pinning at all
    assert tuning_inventory.emulator_cpuset(plain, dedicated=True) == "0-7"
    assert tuning_inventory.shared_cpuset(tuned) == "0-1"
    assert tuning_inventory.vm_allowance(tuned, "dedicated", (4, 5)) == {4, 5}
    assert tuning_inventory.vm_allowance(tuned, "shared", ()) == {0, 1}


# ------------------------------------------------------------------ with the scheduler


def test_dedicated_pick_is_numa_local_and_skips_claimed_cpus() -> None:
    record = host(tuning=report(), used={"PCPU": 1, "PCPU:4": 1})
    snapshot = fleet.snapshot([record], CONFIG, NOW)
    two = place(snapshot, request(2))
    assert isinstance(two, Placement)
    assert two.pcpus == (2, 3)  # cell 0 has exactly 2 free: the smallest cell that fits
    four = place(snapshot, request(3))
    assert isinstance(four, Placement)
    assert four.pcpus == (5, 6, 7)  # cell 1 (4 claimed): 5-7


def test_dedicated_refusals_name_each_host() -> None:
    full = host(
        "full",
        tuning=report(dedicated_cpus="6-7", shared_cpus="0-5"),
        used={"PCPU": 2, "PCPU:6": 1, "PCPU:7": 1},
    )
    none = host("none", tuning=report(dedicated_cpus="", shared_cpus="0-7"))
    some = host("some", tuning=report())
    snapshot = fleet.snapshot([full, none, some], CONFIG, NOW)
    refused = place(snapshot, request(7))
    assert isinstance(refused, Refusal)
    reasons = {r.host_id: r for r in refused.reasons}
    assert reasons["full"].rule is Rule.DEDICATED_CPUS
    assert reasons["full"].message == "dedicated cpu short by 7 pCPU at ratio 1.0"
    assert reasons["none"].message == "no dedicated cpu inventory (requested 7 pCPU)"
    assert reasons["some"].short_by == 1
    placed = place(snapshot, request(2))
    assert isinstance(placed, Placement) and placed.host_id == "some"


def test_bookkeeping_catches_a_cpu_the_inventory_counts_as_free() -> None:
    # The PCPU count says 1 used, but CPUs 2-6 are held (e.g. a VM whose count was lost).
    keys = tuning_inventory.pcpu_allocations((2, 3, 4, 5, 6))
    record = host(tuning=report(), used={"PCPU": 1, **keys})
    refused = place(fleet.snapshot([record], CONFIG, NOW), request(2))
    assert isinstance(refused, Refusal)
    assert refused.reasons[0].message == "only 1 free pinnable CPUs, need 2"


def test_hugepage_requests_need_free_pages() -> None:
    record = host(tuning=report(hugepages=(HugepagePool(2048, 64, 64, mounted=True),)))
    snapshot = fleet.snapshot([record], CONFIG, NOW)
    assert isinstance(place(snapshot, request(1, 128, dedicated=False, pages=2048)), Placement)
    refused = place(snapshot, request(1, 256, dedicated=False, pages=2048))
    assert isinstance(refused, Refusal)
    assert refused.reasons[0].rule is Rule.HUGEPAGES
    assert refused.reasons[0].message == "2M hugepages short by 64 pages at ratio 1.0"
