"""End to end: the real controller and three real agent processes on the real broker,
driven by the ``virtfleet`` CLI as an operator would.

The agents simulate hosts of three sizes with libvirt's test driver (node XML files in
tests/fixtures/nodes). Each module gets its own RabbitMQ vhost and database.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from vfsupport import CliResult, Fleet, fresh_database, private_vhost, running_fleet, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.db]

SIZES = {"small": (8, 16384), "medium": (16, 65536), "large": (32, 131072)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    with running_fleet(tmp, {name: (name,) for name in SIZES}) as f:
        yield f


def _fail_with_logs(fleet: Fleet, message: str) -> str:
    return f"{message}\n{fleet.logs()}"


def test_hosts_report_their_size(fleet: Fleet) -> None:
    hosts = fleet.hosts()
    for name, (cpus, memory) in SIZES.items():
        assert hosts[name]["status"] == "up"
        assert hosts[name]["cpus"] == cpus
        assert hosts[name]["memory_mib"] == memory
        assert hosts[name]["hypervisor_type"].lower() == "test"
    shown = fleet.cli_ok("host", "show", "medium")
    by_resource = {r["resource"]: r for r in shown["resources"]}
    assert by_resource["MEMORY_MIB"]["reserved"] == 512
    assert by_resource["MEMORY_MIB"]["capacity"] == 65536 - 512
    assert by_resource["VCPU"]["capacity"] == 16 * 4


def test_vm_lands_only_where_it_fits(fleet: Fleet) -> None:
    # 20 GiB cannot fit the small host (15.5 GiB usable): it must go elsewhere.
    created = fleet.cli_ok("vm", "create", "fits-big", "--vcpus", "2", "--memory", "20480", "--disk", "5")
    assert created["vm"]["host"] in {"medium", "large"}
    assert created["vm"]["status"] == "active"
    assert created["vm"]["power_state"] == "running"
    assert created["placement"]["host"] == created["vm"]["host"]
    rejected = {r["host"]: r for r in created["placement"]["rejected"]}
    assert rejected["small"]["rule"] == "capacity"
    assert "memory short by" in rejected["small"]["message"]

    forced = fleet.cli_ok("vm", "create", "on-small", "--memory", "1024", "--disk", "2", "--host", "small")
    assert forced["vm"]["host"] == "small"
    shown = fleet.cli_ok("vm", "show", "on-small")
    assert shown["host"] == "small"
    assert shown["power_state"] == "running"
    listed = {v["name"]: v for v in fleet.cli_ok("vm", "list")["vms"]}
    assert {"fits-big", "on-small"} <= set(listed)


def test_vm_that_fits_nowhere_is_refused_with_reasons_per_host(fleet: Fleet) -> None:
    result = fleet.cli("vm", "create", "too-big", "--memory", "400000", "--disk", "1")
    assert result.code == 4, result.stdout + result.stderr
    error = result.json["error"]
    assert error["type"] == "NoValidHost"
    reasons = {r["host"]: r for r in error["details"]["reasons"]}
    assert set(reasons) == set(SIZES)
    for host, reason in reasons.items():
        assert reason["rule"] == "capacity", reason
        assert reason["resource"] == "MEMORY_MIB"
        assert reason["short_by"] > 0
        assert f"{host}: " not in reason["message"]  # the message is per host, the host is a field
    assert "memory short by" in error["message"]
    assert fleet.cli("vm", "show", "too-big").code == 3  # nothing was recorded

    text = fleet.cli("vm", "create", "too-big", "--memory", "400000", output="table")
    assert text.code == 4
    for host in SIZES:
        assert host in text.stderr


def test_bad_input_gets_a_clear_error_and_changes_nothing(fleet: Fleet) -> None:
    before = fleet.cli_ok("vm", "list")["vms"]
    bad_name = fleet.cli("vm", "create", "bad name!", "--memory", "64")
    assert bad_name.code == 2
    assert "invalid VM name" in bad_name.json["error"]["message"]
    zero = fleet.cli("vm", "create", "zero-cpu", "--vcpus", "0")
    assert zero.code == 2
    assert "vcpus must be a positive integer" in zero.json["error"]["message"]
    unknown_host = fleet.cli("vm", "create", "nowhere", "--host", "no-such-host")
    assert unknown_host.code == 3
    assert "no-such-host" in unknown_host.json["error"]["message"]
    fleet.cli_ok("vm", "create", "dup", "--memory", "256", "--disk", "1")
    dup = fleet.cli("vm", "create", "dup", "--memory", "256", "--disk", "1")
    assert dup.code == 4
    assert dup.json["error"]["type"] == "AlreadyExists"
    missing = fleet.cli("vm", "start", "no-such-vm")
    assert missing.code == 3
    after = fleet.cli_ok("vm", "list")["vms"]
    assert {v["name"] for v in after} == {v["name"] for v in before} | {"dup"}


def test_dry_run_claims_nothing(fleet: Fleet) -> None:
    before = fleet.cli_ok("host", "show", "large")["resources"]
    plan = fleet.cli_ok("vm", "create", "dry", "--memory", "2048", "--disk", "1", "--dry-run")
    assert plan["dry_run"] is True
    assert plan["vm"] is None
    assert plan["placement"]["host"] in SIZES
    assert plan["placement"]["candidates"][0]["host"] == plan["placement"]["host"]
    assert fleet.cli_ok("host", "show", "large")["resources"] == before
    assert fleet.cli("vm", "show", "dry").code == 3


def _reason(fleet: Fleet, name: str, host: str) -> dict[str, str]:
    refused = fleet.cli("vm", "create", name, "--memory", "64", "--disk", "1", "--host", host)
    assert refused.code == 4, refused.stdout + refused.stderr
    return next(r for r in refused.json["error"]["details"]["reasons"] if r["host"] == host)


def test_disabled_and_maintenance_hosts_take_nothing_and_say_why(fleet: Fleet) -> None:
    fleet.cli_ok("host", "disable", "large", "--reason", "PSU swap")
    fleet.cli_ok("host", "maintenance", "medium", "--reason", "BIOS 2.1")
    try:
        shown = fleet.cli_ok("host", "show", "large")
        assert (shown["enabled"], shown["state_reason"]) == (False, "PSU swap")
        assert "PSU swap" in fleet.cli("host", "show", "large", output="table").stdout
        large = _reason(fleet, "to-large", "large")
        assert (large["rule"], large["message"]) == ("disabled", "disabled by an operator: PSU swap")
        medium = _reason(fleet, "to-medium", "medium")
        assert (medium["rule"], medium["message"]) == ("maintenance", "in maintenance: BIOS 2.1")
        # A second switch without a reason keeps the first one.
        fleet.cli_ok("host", "disable", "medium")
        assert fleet.cli_ok("host", "show", "medium")["state_reason"] == "BIOS 2.1"
        placed = fleet.cli_ok("vm", "create", "only-small", "--memory", "64", "--disk", "1")
        assert placed["vm"]["host"] == "small"
        fleet.cli_ok("vm", "delete", "only-small")
    finally:
        fleet.cli_ok("host", "enable", "large")
        fleet.cli_ok("host", "enable", "medium")
        fleet.cli_ok("host", "maintenance", "medium", "--off")
    # Back in service: the reason is forgotten, and the hosts take VMs again.
    assert fleet.cli_ok("host", "show", "large")["state_reason"] is None
    assert fleet.cli_ok("host", "show", "medium")["state_reason"] is None
    assert fleet.cli_ok(
        "vm", "create", "to-large", "--memory", "64", "--disk", "1", "--host", "large", "--dry-run"
    )


def test_lifecycle_through_the_cli(fleet: Fleet) -> None:
    fleet.cli_ok("vm", "create", "life", "--memory", "512", "--disk", "1")
    assert fleet.cli_ok("vm", "destroy", "life")["vm"]["power_state"] == "shutoff"
    assert fleet.cli_ok("vm", "start", "life")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "shutdown", "life", "--grace", "10")["vm"]["power_state"] == "shutoff"
    host = fleet.cli_ok("vm", "show", "life")["host"]
    used_before = _used(fleet, host)
    fleet.cli_ok("vm", "delete", "life", "--delete-disks")
    assert fleet.cli("vm", "show", "life").code == 3
    used_after = _used(fleet, host)
    assert used_before["MEMORY_MIB"] - used_after["MEMORY_MIB"] == 512


def _used(fleet: Fleet, host: str) -> dict[str, int]:
    return {r["resource"]: r["used"] for r in fleet.cli_ok("host", "show", host)["resources"]}


def _resources(fleet: Fleet, host: str) -> dict[str, dict[str, Any]]:
    return {r["resource"]: r for r in fleet.cli_ok("host", "show", host)["resources"]}


def test_50_concurrent_creates_never_exceed_capacity(fleet: Fleet) -> None:
    size = {"VCPU": 1, "MEMORY_MIB": 4096, "DISK_GIB": 1}
    expected = 0
    for host in SIZES:
        res = _resources(fleet, host)
        expected += min(res[r]["free"] // amount for r, amount in size.items())
    assert 0 < expected < 50, f"the fleet must be over-subscribed by 50 creates; it fits {expected}"

    def create(i: int) -> int:
        return fleet.cli("vm", "create", f"burst-{i:02d}", "--memory", "4096", "--disk", "1").code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(create, range(50)))
    assert sorted(set(codes)) <= [0, 4], _fail_with_logs(fleet, f"unexpected exit codes {codes}")
    assert codes.count(0) == expected, _fail_with_logs(fleet, f"{codes.count(0)} created, {expected} fit")
    for host in SIZES:
        for name, r in _resources(fleet, host).items():
            assert r["used"] <= r["capacity"], f"{host} {name} over capacity: {r}"
            assert r["free"] >= 0
    burst = [v for v in fleet.cli_ok("vm", "list")["vms"] if v["name"].startswith("burst-")]
    assert len(burst) == expected
    assert all(v["status"] == "active" for v in burst)


def test_fleet_recovers_when_the_broker_drops_every_connection(fleet: Fleet) -> None:
    vhost = unquote(urlparse(fleet.amqp_url).path.lstrip("/"))
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "test: broker restart"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # Agents reconnect, heartbeat again; the controller serves the API again.
    fleet.wait_hosts(set(SIZES), timeout=60)

    def create() -> CliResult | None:
        # The idempotency key makes a retry after an ambiguous failure create the VM once.
        args = ("vm", "create", "after-drop", "--memory", "64", "--disk", "1", "--idempotency-key", "k-drop")
        result = fleet.cli(*args)
        return result if result.code == 0 else None

    created = wait_until(create, 60, "a create to succeed after the drop")
    assert created.json["vm"]["name"] == "after-drop"
    assert [v["name"] for v in fleet.cli_ok("vm", "list")["vms"]].count("after-drop") == 1
    assert all(p.alive() for p in fleet.procs), fleet.logs()


def test_killed_agent_marks_host_down_and_it_is_not_chosen(fleet: Fleet) -> None:
    agent = next(p for p in fleet.procs if p.name == "agent-small")
    agent.kill()
    fleet.wait_hosts({"small"}, status="down", timeout=30)
    refused = fleet.cli("vm", "create", "after-kill", "--memory", "64", "--disk", "1", "--host", "small")
    assert refused.code == 4
    reasons = refused.json["error"]["details"]["reasons"]
    assert any(r["host"] == "small" and r["rule"] == "host_down" for r in reasons), reasons
    placed = [
        fleet.cli_ok("vm", "create", f"after-kill-{i}", "--memory", "64", "--disk", "1") for i in range(3)
    ]
    assert all(p["vm"]["host"] != "small" for p in placed)
    wait_until(lambda: fleet.hosts()["medium"]["status"] == "up", 10, "the other hosts to stay up")


@pytest.fixture
def lonely_controller(tmp_path: Path) -> Iterator[Fleet]:
    with private_vhost() as url, fresh_database(tmp_path) as db:
        f = Fleet(tmp_path, url, db)
        yield f
        f.stop_all()


def test_cli_says_clearly_when_no_controller_runs(lonely_controller: Fleet) -> None:
    result = lonely_controller.cli("host", "list", output="table")
    assert result.code == 5
    assert "no virtfleet controller is running" in result.stderr
