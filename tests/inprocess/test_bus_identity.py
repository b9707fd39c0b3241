"""Who a message is from, in-process: every party of the fleet logs in as itself (the controller as
``controller``, each agent as ``agent-<host>``, the CLI as an operator), and a hypervisor's login
cannot call the API, command another host or report for it (issue 12, attacks 1-3).

The memory broker stamps each message with its connection's login as RabbitMQ does; tests/security
runs the same attacks against RabbitMQ with the bootstrapped users and permissions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from builders import host_report
from inproc import HostShape, InProcessFleet, inprocess_fleet

from common.errors import PermissionDenied, Unauthenticated
from common.messages import api, host, vm
from common.messages.descriptor import Op
from common.messages.envelope import Envelope
from common.messages.vm import PowerState
from common.transport.rpc import request, unwrap
from common.transport.topology import (
    API_QUEUE,
    DEFAULT_EXCHANGE,
    HEARTBEATS_QUEUE,
    REPORTS_EXCHANGE,
    REPORTS_QUEUE,
    agent_queue,
    report_routing_key,
)

# SQLite only (deploy/test.sh): who may send what is checked on the bus; the database only holds the fleet.
pytestmark = pytest.mark.backend_neutral


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"victim": HostShape("small"), "mallory": HostShape("small")}
    with inprocess_fleet(tmp_path_factory.mktemp("identity"), hosts) as f:
        created = f.cli("vm", "create", "web", "--memory", "128", "--disk", "1", "--host", "victim")
        assert created.code == 0, created.stdout + created.stderr
        yield f


def vm_state(fleet: InProcessFleet) -> tuple[str, PowerState]:
    shown = fleet.cli_ok("vm", "show", "web")
    return shown["status"], fleet.fake("victim").hypervisor.state_of(shown["uuid"])


def facts(view: dict[str, Any]) -> tuple[Any, ...]:
    """What a forged full report (1 MiB of memory, no VMs) would rewrite in a host's row."""
    return view["memory_mib"], view["cpus"], view["vm_count"], view["vms"], view["resources"]


def call_as(fleet: InProcessFleet, login: str, routing_key: str, env: Envelope) -> Envelope:
    transport = fleet.broker.transport(f"attacker-{login}", user=login)
    try:
        return transport.call(DEFAULT_EXCHANGE, routing_key, env, 30)
    finally:
        transport.close()


def publish_as(fleet: InProcessFleet, login: str, exchange: str, routing_key: str, env: Envelope) -> None:
    transport = fleet.broker.transport(f"attacker-{login}", user=login)
    try:
        transport.publish(exchange, routing_key, env, mandatory=True)
    finally:
        transport.close()


def forged(op: Op[Any, Any], body: Any) -> Envelope:
    return request(op, body, "controller:forged", timeout=30)


def test_the_fleet_runs_with_distinct_logins(fleet: InProcessFleet) -> None:
    assert vm_state(fleet) == ("active", PowerState.RUNNING)
    assert fleet.hosts()["victim"]["status"] == "up"


def test_an_agent_login_cannot_call_the_api(fleet: InProcessFleet) -> None:
    env = forged(api.API_VM_DELETE, api.VmDeleteRequest(name="web", delete_disks=True))
    reply = call_as(fleet, "agent-mallory", API_QUEUE.name, env)
    with pytest.raises(PermissionDenied, match="cannot call the API"):
        unwrap(reply, api.API_VM_DELETE)
    assert vm_state(fleet) == ("active", PowerState.RUNNING)


def test_an_agent_obeys_only_the_controller_login(fleet: InProcessFleet) -> None:
    uuid = fleet.cli_ok("vm", "show", "web")["uuid"]
    env = forged(vm.VM_DESTROY, vm.VmAction(vm.VmRef(uuid=uuid, name="web")))
    reply = call_as(fleet, "agent-mallory", agent_queue("victim").name, env)
    with pytest.raises(Unauthenticated, match="obey only the controller"):
        unwrap(reply, vm.VM_DESTROY)
    assert vm_state(fleet) == ("active", PowerState.RUNNING)


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [
        (REPORTS_EXCHANGE.name, report_routing_key(host.HOST_REPORT.kind, "mallory")),
        (DEFAULT_EXCHANGE, REPORTS_QUEUE.name),
    ],
    ids=["reports-exchange", "straight-into-the-queue"],
)
def test_a_host_cannot_report_for_another(fleet: InProcessFleet, exchange: str, routing_key: str) -> None:
    before = fleet.hosts()["victim"]
    dead = len(fleet.broker.dead_letters())
    report = host_report("victim", memory_mib=1, memory_free_mib=1, seq=10**6, started_at=time.time())
    publish_as(fleet, "agent-mallory", exchange, routing_key, forged(host.HOST_REPORT, report))
    assert fleet.broker.wait_for(lambda: len(fleet.broker.dead_letters()) > dead, 30)
    assert fleet.broker.dead_letters()[-1].user_id == "agent-mallory"
    assert facts(fleet.hosts()["victim"]) == facts(before)  # not 1 MiB, and its VM not gone
    assert vm_state(fleet) == ("active", PowerState.RUNNING)


def test_a_host_cannot_heartbeat_for_another(fleet: InProcessFleet) -> None:
    dead = len(fleet.broker.dead_letters())
    beat = host.Heartbeat(host_id="victim", seq=1, started_at=time.time(), sent_at=time.time())
    key = report_routing_key(host.HOST_HEARTBEAT.kind, "mallory")
    publish_as(fleet, "agent-mallory", REPORTS_EXCHANGE.name, key, forged(host.HOST_HEARTBEAT, beat))
    publish_as(
        fleet, "agent-mallory", DEFAULT_EXCHANGE, HEARTBEATS_QUEUE.name, forged(host.HOST_HEARTBEAT, beat)
    )
    assert fleet.broker.wait_for(lambda: len(fleet.broker.dead_letters()) >= dead + 2, 30)
