"""End to end, a smoke set: the real controller and two real agent processes on the real broker,
driven by the ``virtfleet`` CLI as an operator would.

The agents simulate hosts of two sizes with libvirt's test driver (node XML files in
tests/fixtures/nodes). The module gets its own RabbitMQ vhost and database. This proves the
wiring only (processes, entry points, AMQP, libvirt's driver, signals, exit codes); what the
fleet does is tested in process, in tests/inprocess/test_fleet.py and its neighbours.

The tests share one fleet and run in order: the last one stops the daemons.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vfsupport import SHORT_DOWN_AFTER_S, Fleet, node_uri, running_fleet

pytestmark = [pytest.mark.broker, pytest.mark.db]

SIZES = {"small": (8, 16384), "medium": (16, 65536)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    # Light work only (no bursts that delay heartbeats), and one test kills an agent: short down-after.
    with running_fleet(tmp, {name: (name,) for name in SIZES}, down_after=SHORT_DOWN_AFTER_S) as f:
        yield f


def test_hosts_come_up_and_report_their_size(fleet: Fleet) -> None:
    hosts = fleet.hosts()
    for name, (cpus, memory) in SIZES.items():
        assert hosts[name]["status"] == "up"
        assert (hosts[name]["cpus"], hosts[name]["memory_mib"]) == (cpus, memory)
        assert hosts[name]["hypervisor_type"].lower() == "test"  # what libvirt's test driver says
        assert hosts[name]["libvirt_uri"] == node_uri(name)
    table = fleet.cli("host", "list", output="table")
    assert table.code == 0, table.stderr
    assert all(name in table.stdout for name in SIZES)


def test_a_vm_is_created_listed_shown_and_deleted(fleet: Fleet) -> None:
    made = fleet.cli(
        "vm", "create", "smoke", "--memory", "64", "--disk", "1", "--host", "medium", output="table"
    )
    assert made.code == 0, made.stdout + made.stderr + fleet.logs()
    assert "smoke created on host medium (active, running)" in made.stdout
    listed = {v["name"]: v for v in fleet.cli_ok("vm", "list")["vms"]}
    assert (listed["smoke"]["host"], listed["smoke"]["power_state"]) == ("medium", "running")
    shown = fleet.cli_ok("vm", "show", "smoke")
    assert (shown["host"], shown["status"], shown["memory_mib"]) == ("medium", "active", 64)
    deleted = fleet.cli("vm", "delete", "smoke", "--delete-disks", output="table")
    assert deleted.code == 0 and "deleted smoke and its disks" in deleted.stdout
    missing = fleet.cli("vm", "show", "smoke")
    assert missing.code == 3 and missing.json["error"]["type"] == "NotFound"


def test_a_killed_agent_makes_its_host_down_and_a_restarted_one_up(fleet: Fleet) -> None:
    agent = next(p for p in reversed(fleet.procs) if p.name == "agent-small")
    agent.kill()  # SIGKILL: no last report, no goodbye
    fleet.wait_hosts({"small"}, status="down", timeout=SHORT_DOWN_AFTER_S + 60)
    refused = fleet.cli("vm", "create", "after-kill", "--memory", "64", "--disk", "1", "--host", "small")
    assert refused.code == 4, refused.stdout + refused.stderr
    reasons = refused.json["error"]["details"]["reasons"]
    assert any(r["host"] == "small" and r["rule"] == "host_down" for r in reasons), reasons

    fleet.start_agent("small", node_uri("small"))
    fleet.wait_hosts({"small"}, timeout=60)
    fleet.wait_hosts({"medium"}, timeout=10)  # the other host stays up


def test_daemons_stop_on_sigterm_and_then_the_cli_says_no_controller_runs(fleet: Fleet) -> None:
    agent = next(p for p in reversed(fleet.procs) if p.name == "agent-medium")
    assert agent.stop() == 0, agent.log()
    assert "agent medium stopped" in agent.log()
    controller = next(p for p in fleet.procs if p.name == "controller")
    assert controller.stop() == 0, controller.log()
    assert "controller stopped" in controller.log()

    result = fleet.cli("host", "list", output="table")
    assert result.code == 5, result.stdout + result.stderr
    assert "no virtfleet controller is running" in result.stderr
