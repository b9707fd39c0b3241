"""Signed messages end to end in one process: forged and replayed commands do not run, a report
signed with another host's key changes nothing, and the consumers keep serving.

The fleet is signed (tests/inproc.py: a master file, a key file per host). An attacker's copy of
the commands is taken the way one with configure rights on the broker would take it: a queue of
its own bound to the commands exchange with the victim host's routing key.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import fleet_master, wait_until

from agent.main import Agent
from common import codec
from common.messages.base import replace
from common.messages.envelope import Envelope, decode_envelope
from common.messages.host import HOST_REPORT
from common.messages.vm import VM_DESTROY, VM_REBOOT
from common.signing import HostKeyring, Signer, rotate_master
from common.transport.topology import COMMANDS_EXCHANGE, REPORTS_EXCHANGE, Binding, Queue, report_routing_key

# SQLite only (deploy/test.sh): signatures are checked on the bus; the database only holds the fleet.
pytestmark = pytest.mark.backend_neutral

SOON = 20.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"a": HostShape("small"), "b": HostShape("small")}
    with inprocess_fleet(tmp_path_factory.mktemp("signed"), hosts) as f:
        yield f


def agent_of(fleet: InProcessFleet, host: str) -> Agent:
    agent = fleet.hosts_by_name[host].agent
    assert agent is not None
    return agent


def power_state(fleet: InProcessFleet, host: str, name: str) -> str:
    found = [vm for vm in fleet.fake(host).hypervisor.list_statuses() if vm.name == name]
    assert len(found) == 1, found
    return found[0].state.value


def tap(fleet: InProcessFleet, host: str) -> str:
    """A queue that receives a copy of every command to ``host`` (what an eavesdropper records)."""
    queue = Queue(f"tap.{host}", bindings=(Binding(COMMANDS_EXCHANGE, host),))
    fleet.broker.transport("attacker").declare(queue)
    return queue.name


def recorded(fleet: InProcessFleet, queue: str, kind: str) -> Envelope:
    while (message := fleet.broker.get(queue)) is not None:
        env = decode_envelope(message.body)
        if env.kind == kind:
            return env
    raise AssertionError(f"no {kind} recorded")


def test_forged_and_replayed_commands_are_refused_and_the_agent_keeps_serving(fleet: InProcessFleet) -> None:
    created = fleet.cli_ok("vm", "create", "victim", "--memory", "256", "--disk", "1")
    host = created["vm"]["host"]
    taps = tap(fleet, host)
    fleet.cli_ok("vm", "destroy", "victim")
    fleet.cli_ok("vm", "start", "victim")
    assert power_state(fleet, host, "victim") == "running"
    destroy = recorded(fleet, taps, VM_DESTROY.kind)
    assert destroy.signature is not None and destroy.key_id == f"{host}:1"

    other = "b" if host == "a" else "a"
    agent = agent_of(fleet, host)
    refused_before = agent.dispatcher.refused["Unauthenticated"]
    dead_before = len(fleet.broker.dead_letters())
    attacks = {
        # attack 4 of issue 12: a new id, sent in 2020, no expiry (the old signature no longer fits)
        "re-dated": dataclasses.replace(destroy, id="f" * 32, sent_at=1_577_836_800.0, expires_at=None),
        "unsigned": dataclasses.replace(destroy, id="e" * 32, key_id=None, signature=None),
        "other host's key": Signer(HostKeyring(fleet.key_file(other), other))(
            dataclasses.replace(destroy, id="d" * 32), other
        ),
    }
    # Published with the controller's own broker login (as a stolen controller password would):
    # only the signatures tell these apart from genuine commands.
    for env in attacks.values():
        fleet.broker.publish_raw(COMMANDS_EXCHANGE.name, host, env.encode(), user="controller")
    wait_until(
        lambda: len(fleet.broker.dead_letters()) >= dead_before + len(attacks),
        SOON,
        "the forged commands to be dead-lettered",
    )
    assert agent.dispatcher.refused["Unauthenticated"] == refused_before + len(attacks)
    # replayed as-is: the agent's journal answers it (it ran once); it is not run again
    fleet.broker.publish_raw(COMMANDS_EXCHANGE.name, host, destroy.encode(), user="controller")
    wait_until(
        lambda: not fleet.broker.messages(f"virtfleet.agent.{host}"), SOON, "the replay to be consumed"
    )
    assert power_state(fleet, host, "victim") == "running"
    # the agent still serves genuine commands
    assert fleet.cli_ok("vm", "reboot", "victim")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "destroy", "victim")["vm"]["power_state"] == "shutoff"
    assert power_state(fleet, host, "victim") == "shutoff"


def _report_of(fleet: InProcessFleet, host: str, memory_mib: int) -> dict[str, Any]:
    last = agent_of(fleet, host).reporter.last_report
    assert last is not None
    now = time.time()
    forged = replace(last, memory_mib=memory_mib, seq=last.seq + 1000, reported_at=now)
    return dict(codec.to_wire(forged))


def _publish_report(fleet: InProcessFleet, host: str, body: dict[str, Any], signer_host: str) -> None:
    now = time.time()
    env = Envelope(kind=HOST_REPORT.kind, body=body, sender=f"agent:{host}", sent_at=now, expires_at=now + 60)
    signed = Signer(HostKeyring(fleet.key_file(signer_host), signer_host))(env, signer_host)
    # Published with the host's own broker login: only the signature is wrong in the forged one.
    fleet.broker.publish_raw(
        REPORTS_EXCHANGE.name,
        report_routing_key(HOST_REPORT.kind, host),
        signed.encode(),
        user=f"agent-{host}",
    )


def memory_total(fleet: InProcessFleet, host: str) -> int:
    return int(fleet.resources(host)["MEMORY_MIB"]["total"])


def test_a_report_signed_with_another_hosts_key_does_not_change_that_host(fleet: InProcessFleet) -> None:
    assert fleet.controller is not None
    reports = fleet.controller.report_dispatcher
    before = memory_total(fleet, "a")
    refused = reports.refused["Unauthenticated"]
    _publish_report(fleet, "a", _report_of(fleet, "a", 1_000_000), signer_host="b")
    wait_until(lambda: reports.refused["Unauthenticated"] > refused, SOON, "the forged report to be refused")
    assert memory_total(fleet, "a") == before
    # the control: the same report signed with a's own key is applied (so the check above could fail)
    _publish_report(fleet, "a", _report_of(fleet, "a", 1_000_000), signer_host="a")
    wait_until(lambda: memory_total(fleet, "a") == 1_000_000, SOON, "a's own signed report to be applied")


def test_a_key_rotation_keeps_every_host_working(fleet: InProcessFleet) -> None:
    """After ``keys rotate`` the controller keeps signing with the generation each host proved;
    a host given its new key file signs with the new generation, and commands follow it."""
    created = fleet.cli_ok("vm", "create", "rotated", "--host", "a", "--memory", "256", "--disk", "1")
    assert created["vm"]["host"] == "a"
    taps = tap(fleet, "a")
    rotate_master(fleet_master(fleet.tmp), time.time())

    # a has no new key file yet: its commands are still signed with generation 1, and run
    assert fleet.cli_ok("vm", "reboot", "rotated")["vm"]["power_state"] == "running"
    assert recorded(fleet, taps, VM_REBOOT.kind).key_id == "a:1"

    fleet.key_file("a")  # enrolled again: generations 2 and 1; the agent re-reads the file

    def rebooted_with() -> str | None:
        fleet.cli_ok("vm", "reboot", "rotated")
        return recorded(fleet, taps, VM_REBOOT.kind).key_id

    # once a's reports carry generation 2, the controller signs a's commands with it too
    wait_until(lambda: rebooted_with() == "a:2", SOON, "commands to a to be signed with generation 2")
    # b, not enrolled again, keeps working on generation 1 during the grace period
    assert (
        fleet.cli_ok("vm", "create", "on-b", "--host", "b", "--memory", "256", "--disk", "1")["vm"]["host"]
        == "b"
    )
    fleet.wait_hosts({"a", "b"})
