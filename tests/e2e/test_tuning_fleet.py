"""Acceptance (issue 6), end to end: a real controller and two real agents on the real broker,
driven by the ``virtfleet`` CLI. Both hosts are libvirt test-driver hosts of 8 CPUs in 2 NUMA
cells (tests/fixtures/nodes/tuning-numa.xml): ``pin-a`` has dedicated CPUs 2-7, ``pin-b`` only
6-7, which a first VM takes. Dedicated VMs then land on pin-a, NUMA-local, one beyond its free
CPUs is refused with every host's reason, and no pCPU is ever given to two VMs, as libvirt
itself reports the pins.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from vfsupport import Fleet, running_fleet, wait_until

from controller.scheduler.cpus import parse_cpuset

pytestmark = [pytest.mark.broker, pytest.mark.db]

HOSTS = {"pin-a": ("--dedicated-cpus", "2-7", "--shared-cpus", "0-1"), "pin-b": ("--dedicated-cpus", "6-7")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("tuning-fleet")
    with running_fleet(tmp, {name: ("tuning-numa", *sets) for name, sets in HOSTS.items()}) as f:
        for name in HOSTS:
            wait_until(lambda n=name: tuning(f, n)["facts"], 30, f"tuning facts of {name}")
        yield f


def tuning(fleet: Fleet, host: str) -> Any:
    return fleet.cli_ok("host", "tuning", host)


def create(fleet: Fleet, name: str, *args: str) -> Any:
    return fleet.cli("vm", "create", name, "--memory", "256", "--disk", "1", *args)


def dedicated(fleet: Fleet, name: str, vcpus: int, *args: str) -> Any:
    return create(fleet, name, "--vcpus", str(vcpus), "--cpu-policy", "dedicated", *args)


def libvirt_pins(fleet: Fleet) -> dict[str, list[tuple[str, frozenset[int]]]]:
    """Every VM's vCPU pins as the hosts' libvirt reports them, by host."""
    out: dict[str, list[tuple[str, frozenset[int]]]] = {}
    for vm in fleet.cli_ok("vm", "list")["vms"]:
        view = fleet.cli_ok("vm", "affinity", vm["name"])
        for pin in view["affinity"]["vcpu_pins"]:
            out.setdefault(view["host"], []).append((vm["name"], parse_cpuset(pin["cpuset"])))
    return out


def test_hosts_report_topology_and_cpu_sets(fleet: Fleet) -> None:
    facts = tuning(fleet, "pin-a")["facts"]
    assert (facts["sockets"], facts["cores_per_socket"], facts["threads_per_core"]) == (2, 2, 2)
    assert [(c["id"], c["cpus"]) for c in facts["cells"]] == [(0, "0-3"), (1, "4-7")]
    assert (facts["dedicated_cpus"], facts["shared_cpus"], facts["reserved_cpus"]) == ("2-7", "0-1", "")
    assert facts["simulated"] is True
    b = tuning(fleet, "pin-b")
    assert (b["facts"]["dedicated_cpus"], b["facts"]["shared_cpus"], b["free_pcpus"]) == ("6-7", "0-5", "6-7")
    table = fleet.cli("host", "tuning", "pin-a", output="table")
    assert table.code == 0 and "NUMA cell 1" in table.stdout and "dedicated" in table.stdout


def test_dedicated_vms_land_where_cpus_are_free_and_never_share_one(fleet: Fleet) -> None:
    # pin-b's two dedicated CPUs go to a first VM: afterwards pin-b has none free.
    filled = dedicated(fleet, "fill-b", 2, "--host", "pin-b")
    assert filled.code == 0, filled.stdout + filled.stderr
    assert tuning(fleet, "pin-b")["free_pcpus"] == ""

    first = dedicated(fleet, "ded-1", 2)
    assert first.code == 0, first.stdout + first.stderr
    assert first.json["vm"]["host"] == "pin-a"
    rejected = {r["host"]: r["message"] for r in first.json["placement"]["rejected"]}
    assert rejected["pin-b"] == "dedicated cpu short by 2 pCPU at ratio 1.0"
    view = fleet.cli_ok("vm", "affinity", "ded-1")
    assert (view["cpu_policy"], view["pcpus"], view["allowance"]) == (
        "dedicated",
        "2-3",
        "2-3",
    )  # NUMA cell 0
    assert [(p["vcpu"], p["cpuset"]) for p in view["affinity"]["vcpu_pins"]] == [(0, "2"), (1, "3")]
    assert view["affinity"]["emulator_cpuset"] == "0-1"

    # Beyond pin-a's 4 free CPUs: refused, with every host's reason.
    refused = dedicated(fleet, "ded-big", 5)
    assert refused.code == 4, refused.stdout + refused.stderr
    error = refused.json["error"]
    assert error["type"] == "NoValidHost"
    reasons = {r["host"]: r for r in error["details"]["reasons"]}
    assert reasons["pin-a"]["rule"] == "dedicated_cpus"
    assert reasons["pin-a"]["message"] == "dedicated cpu short by 1 pCPU at ratio 1.0"
    assert reasons["pin-b"]["message"] == "dedicated cpu short by 5 pCPU at ratio 1.0"

    # Six concurrent 1-vCPU creates for pin-a's 4 free CPUs: 4 land, 2 are refused.
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: dedicated(fleet, f"race-{i}", 1), range(6)))
    codes = sorted(r.code for r in results)
    assert codes == [0, 0, 0, 0, 4, 4], [r.stdout + r.stderr for r in results]
    assert tuning(fleet, "pin-a")["free_pcpus"] == ""

    pins = libvirt_pins(fleet)
    for host, dedicated_set in (("pin-a", set(range(2, 8))), ("pin-b", {6, 7})):
        cpus = [cpu for _vm, pinned in pins[host] for cpu in pinned]
        assert all(len(p) == 1 for _vm, p in pins[host]), pins[host]
        assert len(cpus) == len(set(cpus)), f"a pCPU of {host} is pinned twice: {pins[host]}"
        assert set(cpus) == dedicated_set
    held = {vm["name"]: vm["pcpus"] for vm in tuning(fleet, "pin-a")["pinned"]}
    assert set(held) == {"ded-1", *(f"race-{i}" for i, r in enumerate(results) if r.code == 0)}

    # Deleting a VM gives its CPUs back.
    fleet.cli_ok("vm", "delete", "ded-1")
    assert tuning(fleet, "pin-a")["free_pcpus"] == "2-3"
    again = dedicated(fleet, "ded-2", 2)
    assert again.code == 0 and again.json["vm"]["host"] == "pin-a"
    # Its vCPUs are pinned one to one: the count cannot change live, and nothing is claimed.
    held_before = tuning(fleet, "pin-a")["pinned"]
    changed = fleet.cli("vm", "setvcpus", "ded-2", "3")
    assert changed.code == 1 and "has dedicated CPUs" in changed.json["error"]["message"]
    assert tuning(fleet, "pin-a")["pinned"] == held_before


def test_live_repin_within_the_allowance(fleet: Fleet) -> None:
    assert create(fleet, "shared-1", "--vcpus", "2", "--host", "pin-a").code == 0
    view = fleet.cli_ok("vm", "pin", "shared-1", "--vcpu", "1", "--cpus", "1")
    assert view["allowance"] == "0-1"
    assert [(p["vcpu"], p["cpuset"]) for p in view["affinity"]["vcpu_pins"]] == [(0, "0-1"), (1, "1")]
    outside = fleet.cli("vm", "pin", "shared-1", "--vcpu", "0", "--cpus", "2")
    assert outside.code == 2
    assert "outside its allowance 0-1 (the host's shared CPUs)" in outside.json["error"]["message"]
    emulator = fleet.cli_ok("vm", "pin", "shared-1", "--emulator", "--cpus", "0")
    assert emulator["affinity"]["emulator_cpuset"] == "0"


def test_hugepages_io_scheduler_and_profile_on_a_simulated_host(fleet: Fleet) -> None:
    refused = create(fleet, "hp-1", "--hugepage-size", "2M", "--host", "pin-b")
    assert refused.code == 4
    assert "2M hugepages short by 128 pages" in refused.json["error"]["message"]
    done = fleet.cli_ok("host", "hugepages", "pin-b", "--size", "2M", "--count", "128")
    assert done["result"]["pool"]["total"] == 128
    wait_until(lambda: tuning(fleet, "pin-b")["facts"]["hugepages"][0]["total"] == 128, 30, "the new pool")
    placed = create(fleet, "hp-1", "--hugepage-size", "2M", "--host", "pin-b")
    assert placed.code == 0, placed.stdout + placed.stderr
    assert tuning(fleet, "pin-b")["hugepages_claimed"] == {"2M": 128}
    shrink = fleet.cli("host", "hugepages", "pin-b", "--size", "2M", "--count", "64")
    assert shrink.code == 4 and "claim 128" in shrink.json["error"]["message"]

    io = fleet.cli_ok("host", "io-scheduler", "pin-b", "vda", "kyber")
    assert (io["result"]["before"], io["result"]["after"]) == ("mq-deadline", "kyber")
    assert fleet.cli("host", "io-scheduler", "pin-b", "vda", "cfq").code == 2
    first = fleet.cli_ok("host", "tune", "pin-b", "--profile", "virt-host", "--hugepages", "2M=256")
    changed = {c["setting"]: (c["before"], c["after"]) for c in first["result"]["changes"] if c["changed"]}
    assert changed == {"io.vda.scheduler": ("kyber", "none"), "hugepages.2M": ("128", "256")}
    second = fleet.cli(
        "host", "tune", "pin-b", "--profile", "virt-host", "--hugepages", "2M=256", output="table"
    )
    assert second.code == 0 and "nothing to change" in second.stdout
