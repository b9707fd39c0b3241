"""Overcommit, reserves, unit limits, host groups and server groups, driven with the CLI.

A real controller and three simulated hosts (libvirt's test driver) on the real broker.
Capacity is checked with `host capacity` and with what the scheduler then accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from vfsupport import Fleet, running_fleet

pytestmark = [pytest.mark.broker, pytest.mark.db]

HOSTS = ("small", "medium", "large")  # 8/16/32 CPUs, 16/64/128 GiB


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("placement-cli")
    with running_fleet(tmp, {name: (name,) for name in HOSTS}) as f:
        yield f


def capacity(fleet: Fleet, host: str) -> dict[str, dict[str, Any]]:
    (entry,) = fleet.cli_ok("host", "capacity", host)["hosts"]
    return {r["resource"]: r for r in entry["resources"]}


def create(fleet: Fleet, name: str, *args: str) -> Any:
    return fleet.cli("vm", "create", name, "--disk", "1", *args)


def reasons(result: Any) -> dict[str, dict[str, Any]]:
    assert result.code == 4, result.stdout + result.stderr
    return {r["host"]: r for r in result.json["error"]["details"]["reasons"]}


def test_capacity_follows_ratios_and_reserves(fleet: Fleet) -> None:
    before = capacity(fleet, "small")
    assert before["VCPU"]["allocation_ratio"] == 4.0 and before["VCPU"]["capacity"] == 8 * 4
    assert before["MEMORY_MIB"]["capacity"] == 16384 - 512 and before["MEMORY_MIB"]["source"] == "fleet"
    for r in before.values():
        assert r["free"] == r["capacity"] - r["used"]

    fleet.cli_ok(
        "host", "set", "small", "--cpu-ratio", "8", "--ram-ratio", "1.5", "--reserved-memory", "1024"
    )
    after = capacity(fleet, "small")
    assert after["VCPU"]["capacity"] == 8 * 8
    assert after["MEMORY_MIB"]["capacity"] == int((16384 - 1024) * 1.5)
    assert after["MEMORY_MIB"]["source"] == "host"
    # The scheduler uses the new figure at once: 20 GiB fits small only with the 1.5 ratio.
    fits = create(fleet, "over-1", "--memory", "20480", "--host", "small")
    assert fits.code == 0, fits.stdout + fits.stderr
    assert capacity(fleet, "small")["MEMORY_MIB"]["used"] == 20480

    bad = fleet.cli("host", "set", "small", "--cpu-ratio", "0")
    assert bad.code == 2 and "ratio" in bad.json["error"]["message"]
    assert capacity(fleet, "small")["VCPU"]["capacity"] == 8 * 8  # nothing changed

    # Lowering the ratio under what is claimed is allowed (running VMs stay) but shows as
    # negative free capacity, and nothing more lands there.
    fleet.cli_ok("host", "set", "small", "--reset", "ram-ratio", "--reset", "--reserved-memory")
    lowered = capacity(fleet, "small")["MEMORY_MIB"]
    assert (lowered["capacity"], lowered["source"]) == (16384 - 512, "fleet")
    assert lowered["free"] == 16384 - 512 - 20480
    refused = reasons(create(fleet, "over-2", "--memory", "64", "--host", "small"))
    assert refused["small"]["rule"] == "capacity"
    fleet.cli_ok("vm", "delete", "over-1")
    fleet.cli_ok("host", "set", "small", "--reset", "cpu-ratio")
    assert capacity(fleet, "small")["VCPU"]["capacity"] == 8 * 4


def test_host_group_defaults_and_host_overrides(fleet: Fleet) -> None:
    fleet.cli_ok("hostgroup", "set", "dense", "--cpu-ratio", "16", "--ram-ratio", "1.2")
    fleet.cli_ok("host", "set", "medium", "--group", "dense")
    vcpu = capacity(fleet, "medium")["VCPU"]
    assert (vcpu["capacity"], vcpu["source"]) == (16 * 16, "group:dense")
    fleet.cli_ok("host", "set", "medium", "--cpu-ratio", "2")  # the host's own setting wins
    assert capacity(fleet, "medium")["VCPU"]["capacity"] == 16 * 2
    assert capacity(fleet, "medium")["MEMORY_MIB"]["allocation_ratio"] == 1.2
    (group,) = [g for g in fleet.cli_ok("hostgroup", "list")["groups"] if g["name"] == "dense"]
    assert group["hosts"] == ["medium"] and group["cpu_ratio"] == 16
    fleet.cli_ok("host", "set", "medium", "--reset", "group", "--reset", "cpu-ratio")
    vcpu = capacity(fleet, "medium")["VCPU"]
    assert (vcpu["capacity"], vcpu["source"]) == (16 * 4, "fleet")


def test_unit_limits_and_max_vms(fleet: Fleet) -> None:
    fleet.cli_ok("host", "set", "large", "--limit", "MEMORY_MIB:min=256,step=256", "--max-vms", "1")
    odd = reasons(create(fleet, "odd", "--memory", "300", "--host", "large"))
    assert odd["large"]["rule"] == "capacity" and "256" in odd["large"]["message"]
    first = create(fleet, "only-one", "--memory", "512", "--host", "large")
    assert first.code == 0, first.stdout + first.stderr
    full = reasons(create(fleet, "second", "--memory", "512", "--host", "large"))
    assert full["large"]["rule"] == "max_vms"
    fleet.cli_ok("vm", "delete", "only-one")
    fleet.cli_ok("host", "set", "large", "--reset", "limit", "--reset", "max-vms")
    assert create(fleet, "odd", "--memory", "300", "--host", "large", "--dry-run").code == 0


def test_anti_affinity_spreads_a_group_and_refuses_when_hosts_run_out(fleet: Fleet) -> None:
    made = fleet.cli_ok("group", "create", "web", "--policy", "anti-affinity", "--max-per-host", "1")
    assert (made["name"], made["policy"], made["max_per_host"]) == ("web", "anti-affinity", 1)
    hosts = []
    for i in range(3):
        placed = create(fleet, f"web-{i}", "--memory", "256", "--server-group", "web")
        assert placed.code == 0, placed.stdout + placed.stderr
        hosts.append(placed.json["vm"]["host"])
    assert sorted(hosts) == sorted(HOSTS)
    fourth = reasons(create(fleet, "web-3", "--memory", "256", "--server-group", "web"))
    assert {r["rule"] for r in fourth.values()} == {"anti_affinity"}
    (group,) = [g for g in fleet.cli_ok("group", "list")["groups"] if g["name"] == "web"]
    assert group["members"] == dict.fromkeys(HOSTS, 1)
    busy = fleet.cli("group", "delete", "web")
    assert busy.code == 4  # still has VMs
    for i in range(3):
        fleet.cli_ok("vm", "delete", f"web-{i}")
    fleet.cli_ok("group", "delete", "web")
    assert "web" not in {g["name"] for g in fleet.cli_ok("group", "list")["groups"]}


def test_affinity_keeps_a_group_together(fleet: Fleet) -> None:
    fleet.cli_ok("group", "create", "db", "--policy", "affinity")
    first = create(fleet, "db-0", "--memory", "256", "--server-group", "db")
    assert first.code == 0, first.stdout + first.stderr
    home = first.json["vm"]["host"]
    for i in (1, 2):
        placed = create(fleet, f"db-{i}", "--memory", "256", "--server-group", "db")
        assert placed.code == 0 and placed.json["vm"]["host"] == home
    elsewhere = next(h for h in HOSTS if h != home)
    refused = reasons(create(fleet, "db-3", "--memory", "256", "--server-group", "db", "--host", elsewhere))
    assert refused[elsewhere]["rule"] == "affinity"
    for i in range(3):
        fleet.cli_ok("vm", "delete", f"db-{i}")


def test_nics_need_their_network_or_bridge_on_the_host(fleet: Fleet) -> None:
    # Every simulated host has the libvirt network `default` and the bridge br0 (node files).
    ok = create(fleet, "nic-ok", "--memory", "256", "--network", "bridge=br0", "--network", "network=default")
    assert ok.code == 0, ok.stdout + ok.stderr
    fleet.cli_ok("vm", "delete", "nic-ok")
    no_bridge = reasons(create(fleet, "nic-br", "--memory", "256", "--network", "bridge=br9"))
    assert {(r["rule"], r["message"]) for r in no_bridge.values()} == {("bridge", "missing bridge br9")}
    assert set(no_bridge) == set(HOSTS)
    no_net = reasons(create(fleet, "nic-net", "--memory", "256", "--network", "network=prod"))
    assert {(r["rule"], r["message"]) for r in no_net.values()} == {("network", "missing network prod")}
    assert fleet.cli("vm", "show", "nic-br").code == 3  # nothing was recorded


def test_unknown_server_group_is_not_found(fleet: Fleet) -> None:
    missing = create(fleet, "lost", "--memory", "256", "--server-group", "nope")
    assert missing.code == 3 and "server group 'nope' does not exist" in missing.json["error"]["message"]
    assert fleet.cli("vm", "show", "lost").code == 3
