"""The in-process fleet itself: it comes up, answers the CLI as a user runs it, and stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet


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
