"""The in-process fleet itself: it comes up, answers the CLI as a user runs it, and stops."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import wait_until


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("smoke"), {"small": HostShape("small")}) as f:
        yield f


def test_a_vm_goes_through_its_life(fleet: InProcessFleet) -> None:
    created = fleet.cli_ok("vm", "create", "web1", "--memory", "256", "--disk", "1")
    assert created["vm"]["host"] == "small" and created["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "reset", "web1")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "destroy", "web1")["vm"]["power_state"] == "shutoff"
    assert fleet.fake("small").hypervisor.count("reset") == 1
    fleet.cli_ok("vm", "delete", "web1", "--delete-disks")
    assert fleet.cli_ok("vm", "list")["vms"] == []


def test_tables_for_people_and_errors_for_scripts(fleet: InProcessFleet, tmp_path: Path) -> None:
    table = fleet.cli("host", "list", output="table")
    assert table.code == 0 and "small" in table.stdout
    missing = fleet.cli("vm", "show", "nope")
    assert missing.code == 3 and missing.json["error"]["type"] == "NotFound"
    usage = fleet.cli("vm", "create", "x", "--bogus")
    assert usage.code == 2 and usage.json["error"]["details"] == {"usage": True}


def test_a_host_id_with_dots_reports_and_takes_vms(tmp_path: Path) -> None:
    # Report routing keys are "<kind>.<host id>": the bindings must take a host id of several words.
    with inprocess_fleet(tmp_path, {"node1.example.com": HostShape("small")}) as f:
        created = f.cli_ok("vm", "create", "web1", "--memory", "256", "--disk", "1")
        assert created["vm"]["host"] == "node1.example.com"


def test_reads_are_answered_while_every_api_worker_waits_on_an_agent(tmp_path: Path) -> None:
    # Two workers, both taken by creates whose agent is stopped (its host still counts as up):
    # `host list` and `vm show` go on their own lane and answer at once.
    with inprocess_fleet(tmp_path, {"small": HostShape("small")}, workers=2) as f:
        f.stop_agent("small")
        with ThreadPoolExecutor(max_workers=2) as pool:
            creates = [
                pool.submit(f.cli, "vm", "create", f"slow{n}", "--memory", "64", "--disk", "1", timeout=60)
                for n in range(2)
            ]
            wait_until(
                lambda: len(f.cli("vm", "list", "--all", timeout=10).json["vms"]) == 2, 10, "both claims"
            )
            assert not any(c.done() for c in creates)
            hosts = f.cli("host", "list", timeout=5)
            assert hosts.code == 0, hosts.stderr
            shown = f.cli("vm", "show", "slow0", timeout=5)
            assert shown.code == 0 and shown.json["status"] == "building", shown.stderr
            f.start_agent("small")
            assert [c.result().code for c in creates] == [0, 0]
