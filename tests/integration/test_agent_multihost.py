"""One ``virtfleet-agent --simulate 20`` process as twenty hosts of a real fleet: a controller, the
real broker (a private vhost) and libvirt's test driver (a private connection per host).

Every host reports and heartbeats on its own, and a command for one host reaches that host only:
its journal (one per host, in ``<state dir>/<host id>``) records it, no other host's does, and the
VM exists on that host's libvirt connection alone (the others' reports list no VM).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from vfsupport import BIN, NODES, Fleet, enrolled_key, private_fleet, wait_until

from common.messages.vm import VM_CREATE

# SQLite only (deploy/test.sh): what is tested is routing per host on the bus; the database only
# stores the reports.
pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.backend_neutral]

COUNT = 20
HOSTS = {f"sim-{n:02d}" for n in range(1, COUNT + 1)}
TARGET = "sim-07"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("multihost")
    with private_fleet(tmp) as f:
        for host in HOSTS:
            enrolled_key(tmp, host)
        f.start_controller()
        f._spawn(
            "agent-multi",
            [
                str(BIN / "virtfleet-agent"),
                "--simulate",
                str(COUNT),
                "--node-template",
                str(NODES / "small.xml"),
                "--state-dir",
                str(tmp / "hosts"),
                "--key-file",
                str(tmp / "keys" / "{host}.key"),  # one key file per simulated host
                "--heartbeat-interval",
                "1",
                "--report-interval",
                "5",
            ],
        )
        f.wait_hosts(HOSTS)
        yield f


def journal_kinds(fleet: Fleet, host: str) -> list[str]:
    """The kinds of the commands ``host``'s journal recorded (read beside the running agent: WAL)."""
    db = sqlite3.connect(f"file:{fleet.tmp / 'hosts' / host / 'journal.db'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT kind FROM journal ORDER BY seq")]
    finally:
        db.close()


def test_every_simulated_host_reports_and_heartbeats_on_its_own(fleet: Fleet) -> None:
    hosts = fleet.hosts()
    assert set(hosts) == HOSTS
    assert {h["status"] for h in hosts.values()} == {"up"}
    # Each is its own libvirt connection on the template: the template's size, no shared VMs.
    shown = fleet.cli_ok("host", "show", "sim-13")
    assert (shown["cpus"], shown["memory_mib"], shown["vms"]) == (8, 16384, [])
    first = {h: fleet.cli_ok("host", "show", h)["last_heartbeat"] for h in ("sim-01", "sim-10", "sim-20")}
    wait_until(
        lambda: all(fleet.cli_ok("host", "show", h)["last_heartbeat"] != t for h, t in first.items()),
        30,
        "every host's heartbeat to move on",
    )


def test_a_command_for_one_host_reaches_that_host_only(fleet: Fleet) -> None:
    created = fleet.cli_ok("vm", "create", "web1", "--host", TARGET, "--memory", "256", "--disk", "1")
    assert created["vm"]["host"] == TARGET and created["vm"]["power_state"] == "running"

    assert VM_CREATE.kind in journal_kinds(fleet, TARGET)
    others = {h: journal_kinds(fleet, h) for h in sorted(HOSTS - {TARGET})}
    assert {h: k for h, k in others.items() if VM_CREATE.kind in k} == {}
    assert fleet.cli_ok("host", "show", TARGET)["vms"] == ["web1"]
    assert fleet.cli_ok("host", "show", "sim-08")["vms"] == []


def test_the_agent_stops_cleanly_on_sigterm(fleet: Fleet) -> None:
    agent = next(p for p in fleet.procs if p.name == "agent-multi")
    assert agent.stop() == 0
    assert "agent-sim-01..sim-20 stopped" in agent.log(tail=50)
