"""Alternates and reschedule, with a genuine build failure (no fault injection).

Two hosts: ``real`` is qemu:///system (small: the pack strategy ranks it first) and ``sim`` is
libvirt's test driver with the large node file. The VM boots a kernel that exists on no host
(in the guest pool both agents declare, since every path must lie in a storage pool):
real libvirt refuses to start it ("could not open kernel file"), so the build fails on
``real``; the controller releases that claim, excludes ``real`` and builds on the next
alternate, ``sim`` (the test driver does not open kernel files). Both outcomes are checked
with libvirt's own API on the real host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_guest import GUEST_DIR, QEMU_URI, qemu_connection, require_qemu, write_agent_toml
from vfsupport import Fleet, node_uri, private_fleet

pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.qemu]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    require_qemu()
    config = write_agent_toml(tmp_path / "real-agent.toml")
    sim_config = tmp_path / "sim-agent.toml"  # the kernel path must lie in a pool of both hosts
    sim_config.write_text(f'[agent.pools.guest]\npath = "{GUEST_DIR}"\n')
    with private_fleet(tmp_path) as f:
        f.start_controller("controller", "--strategy", "pack", down_after=30)
        f.start_agent("sim", node_uri("large"), "--config", str(sim_config), heartbeat=2.0)
        f.start_agent("real", QEMU_URI, "--config", str(config), heartbeat=2.0)
        f.wait_hosts({"sim", "real"})
        yield f


def test_a_failed_build_lands_on_the_next_host(fleet: Fleet) -> None:
    name = "vftest-resched"
    args = (
        "vm",
        "create",
        name,
        "--memory",
        "64",
        "--disk",
        "1",
        "--kernel",
        f"{GUEST_DIR}/nonexistent-vmlinuz",
    )
    with qemu_connection() as conn:
        plan = fleet.cli_ok(*args, "--dry-run")
        assert plan["placement"]["host"] == "real"
        assert plan["placement"]["alternates"] == ["sim"]

        created = fleet.cli_ok(*args)
        assert created["vm"]["host"] == "sim", fleet.logs()
        assert created["vm"]["status"] == "active"
        # Nothing was left behind on the host that failed: no domain, no claim.
        assert name not in [d.name() for d in conn.listAllDomains(0)]
        assert fleet.used("real")["MEMORY_MIB"] == 0
        assert fleet.used("sim")["MEMORY_MIB"] == 64
        log = (fleet.tmp / "controller.log").read_text()
        assert f"build of {name} failed on real" in log

        fleet.cli_ok("vm", "delete", name, "--delete-disks")
