"""Who a delivery is from: the broker login checked against what the message may be
(common/transport/identity.py), through the Dispatcher's admission hook."""

from __future__ import annotations

import time
from typing import Any

import pytest

from common import codec
from common.errors import InvalidRequest, PermissionDenied, Unauthenticated
from common.messages import api, host, vm
from common.messages.descriptor import Op
from common.transport.identity import Logins, broker_identity, identity_checks
from common.transport.port import Delivery
from common.transport.rpc import request
from common.transport.topology import REPORTS_QUEUE, report_routing_key

LOGINS = Logins()
CHECK = broker_identity(LOGINS)


def heartbeat(host_id: str) -> Any:
    return host.Heartbeat(host_id=host_id, seq=1, started_at=time.time(), sent_at=time.time())


def deliver(op: Op[Any, Any], body: Any, *, login: str | None, routing_key: str = "k") -> Delivery:
    return Delivery(request(op, body, "someone", timeout=30), routing_key, False, None, login)


def report(host_id: str, *, login: str | None, routing_key: str | None = None) -> Delivery:
    key = routing_key if routing_key is not None else report_routing_key(host.HOST_HEARTBEAT.kind, host_id)
    return deliver(host.HOST_HEARTBEAT, heartbeat(host_id), login=login, routing_key=key)


def delete_call(login: str | None) -> Delivery:
    return deliver(
        api.API_VM_DELETE, api.VmDeleteRequest(name="web"), login=login, routing_key="virtfleet.api"
    )


def destroy_command(login: str | None) -> Delivery:
    body = vm.VmAction(vm.VmRef(uuid="u-1", name="web"))
    return deliver(vm.VM_DESTROY, body, login=login, routing_key="h2")


def test_logins_name_the_controller_and_each_host_agent() -> None:
    assert LOGINS.agent_login("node1.example.com") == "agent-node1.example.com"
    assert LOGINS.host_of("agent-node1.example.com") == "node1.example.com"
    assert LOGINS.host_of("agent-") is None
    assert LOGINS.host_of("controller") is None
    assert LOGINS.host_of("alice") is None
    custom = Logins(controller="vf-ctl", agent="hv-{host}@vf")
    assert custom.host_of("hv-h1@vf") == "h1"
    assert custom.host_of("hv-h1") is None


@pytest.mark.parametrize("pattern", ["agent", "{host}-{host}"])
def test_an_agent_login_pattern_needs_one_host_placeholder(pattern: str) -> None:
    with pytest.raises(InvalidRequest, match="host"):
        Logins(agent=pattern)


def test_the_controller_login_cannot_look_like_an_agent() -> None:
    with pytest.raises(InvalidRequest, match="matches"):
        Logins(controller="agent-x")


def test_api_calls_come_from_operators_only() -> None:
    CHECK(delete_call("alice"), api.API_VM_DELETE)
    for login in ("agent-h1", "controller"):
        with pytest.raises(PermissionDenied, match="cannot call the API"):
            CHECK(delete_call(login), api.API_VM_DELETE)


def test_a_message_without_a_broker_validated_login_is_unauthenticated() -> None:
    for delivery, op in (
        (delete_call(None), api.API_VM_DELETE),
        (report("h1", login=None), host.HOST_HEARTBEAT),
        (destroy_command(""), vm.VM_DESTROY),
    ):
        with pytest.raises(Unauthenticated, match="no user_id"):
            CHECK(delivery, op)


def test_agents_obey_only_the_controller_login() -> None:
    CHECK(destroy_command("controller"), vm.VM_DESTROY)
    for login in ("agent-h1", "alice", "controller2"):
        with pytest.raises(Unauthenticated, match="obey only the controller"):
            CHECK(destroy_command(login), vm.VM_DESTROY)


def test_a_host_reports_only_about_itself_through_the_reports_exchange() -> None:
    CHECK(report("h1", login="agent-h1"), host.HOST_HEARTBEAT)
    refused = [
        report("h2", login="agent-h1"),  # body and key about another host
        report("h2", login="agent-h1", routing_key=report_routing_key(host.HOST_HEARTBEAT.kind, "h1")),
        report("h1", login="agent-h1", routing_key=report_routing_key(host.HOST_HEARTBEAT.kind, "h2")),
        report("h1", login="agent-h1", routing_key=REPORTS_QUEUE.name),  # straight into the queue
        report("h1", login="controller"),
        report("h1", login="alice"),
    ]
    for delivery in refused:
        with pytest.raises(Unauthenticated, match="reports only about itself"):
            CHECK(delivery, host.HOST_HEARTBEAT)


def test_a_report_with_a_malformed_host_id_is_refused_not_crashed() -> None:
    env = request(host.HOST_HEARTBEAT, heartbeat("h1"), "x", timeout=30)
    odd = env.with_body({**codec.to_wire(heartbeat("h1")), "host_id": ["h1"]})
    delivery = Delivery(odd, report_routing_key(host.HOST_HEARTBEAT.kind, "h1"), False, None, "agent-h1")
    with pytest.raises(Unauthenticated):
        CHECK(delivery, host.HOST_HEARTBEAT)


def test_the_development_mode_checks_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    assert identity_checks(LOGINS, trust_broker_logins=False) == []
    assert "NO identity check" in caplog.text
    assert len(identity_checks(LOGINS, trust_broker_logins=True)) == 1
