"""Issue 12's attacks 1, 2, 3, 8 and 9 from a hypervisor's broker login, against a live fleet on the
real RabbitMQ with the users and permissions of deploy/rabbitmq/bootstrap.sh (tests/securefleet.py):
a controller, the agents of ``victim`` and ``mallory`` on libvirt's test driver, and a VM ``web``
on ``victim``. Mallory's login attacks; each test asserts the attack had no effect.

Two layers stand in the way, and each is tested on its own: the broker's permissions (the
bootstrapped ``agent-mallory`` cannot publish where the attack needs to), and the consumers'
identity checks, tested with a *rogue* user of the same name pattern that the broker lets publish
anywhere (a misconfigured broker).
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from securefleet import BrokerUser, SecureBroker, rabbitmqctl, secure_fleet
from vfsupport import Fleet, wait_until

from common import codec
from common.errors import PermissionDenied
from common.messages import api, host, vm
from common.messages.descriptor import Op
from common.messages.envelope import Envelope
from common.transport.amqp import AmqpTransport
from common.transport.rpc import request, unwrap
from common.transport.topology import (
    API_EXCHANGE,
    API_QUEUE,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_POLICY,
    DEAD_LETTER_QUEUE,
    DEFAULT_EXCHANGE,
    HEARTBEATS_QUEUE,
    MAX_MESSAGE_BYTES,
    REPLIES_EXCHANGE,
    REPORTS_EXCHANGE,
    REPORTS_QUEUE,
    agent_queue,
    report_routing_key,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, SecureBroker, dict[str, str]]]:
    tag = uuid.uuid4().hex[:6]
    names = {"victim": f"victim-{tag}", "mallory": f"mallory-{tag}"}
    with secure_fleet(
        tmp_path_factory.mktemp("security"), {names["victim"]: "small", names["mallory"]: "small"}
    ) as (
        fleet,
        broker,
    ):
        created = fleet.cli(
            "vm", "create", "web", "--memory", "128", "--disk", "1", "--host", names["victim"]
        )
        assert created.code == 0, created.stdout + created.stderr
        yield fleet, broker, names


def vm_view(fleet: Fleet) -> dict[str, Any]:
    shown: dict[str, Any] = fleet.cli_ok("vm", "show", "web")
    return shown


def host_facts(fleet: Fleet, host_id: str) -> tuple[Any, ...]:
    """What a forged report would rewrite in a host's row (its size and its VMs)."""
    view = fleet.hosts()[host_id]
    return view["memory_mib"], view["cpus"], view["vm_count"], view["vms"], view["resources"]


def envelope(op: Op[Any, Any], body: Any) -> Envelope:
    return request(op, body, "controller:forged", timeout=60)


def raw_publish(
    broker: SecureBroker, user: BrokerUser, exchange: str, routing_key: str, env: Envelope
) -> None:
    """Publish as ``user`` with a client of the attacker's own, ``user_id`` set as RabbitMQ demands."""
    ch = broker.channel(user)
    try:
        ch.basic_publish(
            exchange, routing_key, env.encode(), pika.BasicProperties(user_id=user.login, type=env.kind)
        )
    finally:
        ch.connection.close()


def refused_by_broker(
    broker: SecureBroker, user: BrokerUser, exchange: str, routing_key: str, env: Envelope
) -> str:
    """The broker's refusal (403 ACCESS_REFUSED) of a publish; fails the test when it is accepted."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        raw_publish(broker, user, exchange, routing_key, env)
    assert refused.value.reply_code == 403, refused.value
    return str(refused.value.reply_text)


def dead_letters(broker: SecureBroker) -> int:
    return broker.queue(DEAD_LETTER_QUEUE.name)[0]


#: What an attack on the VM would change (its CPU time and report times move on their own).
VM_FIELDS = (
    "uuid",
    "host",
    "status",
    "power_state",
    "desired_power",
    "task",
    "vcpus",
    "memory_mib",
    "disk_gib",
)


def still_running(fleet: Fleet, before: dict[str, Any]) -> None:
    after = vm_view(fleet)
    assert (after["status"], after["power_state"]) == ("active", "running")
    assert {k: after[k] for k in VM_FIELDS} == {k: before[k] for k in VM_FIELDS}


# ----------------------------------------------------------------------------------- attack 1


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [
        (DEFAULT_EXCHANGE, API_QUEUE.name),
        (REPLIES_EXCHANGE.name, API_QUEUE.name),
        (API_EXCHANGE.name, API_QUEUE.name),
    ],
    ids=["amq.default", "replies-exchange", "requests-exchange"],
)
def test_an_agent_login_cannot_reach_the_api(
    bed: tuple[Fleet, SecureBroker, dict[str, str]], exchange: str, routing_key: str
) -> None:
    fleet, broker, names = bed
    before = vm_view(fleet)
    env = envelope(api.API_VM_DELETE, api.VmDeleteRequest(name="web", delete_disks=True))
    refused_by_broker(broker, broker.agents[names["mallory"]], exchange, routing_key, env)
    still_running(fleet, before)


def test_an_agent_login_the_broker_lets_through_is_refused_by_the_controller(
    bed: tuple[Fleet, SecureBroker, dict[str, str]],
) -> None:
    fleet, broker, _names = bed
    before = vm_view(fleet)
    rogue = broker.rogue(f"agent-rogue-{uuid.uuid4().hex[:6]}")
    transport = AmqpTransport(broker.url(rogue), "rogue")
    try:
        env = envelope(api.API_VM_DELETE, api.VmDeleteRequest(name="web", delete_disks=True))
        reply = transport.call(DEFAULT_EXCHANGE, API_QUEUE.name, env, 60)
    finally:
        transport.close()
    with pytest.raises(PermissionDenied, match="cannot call the API"):
        unwrap(reply, api.API_VM_DELETE)
    still_running(fleet, before)


# ----------------------------------------------------------------------------------- attack 2


def destroy(fleet: Fleet) -> Envelope:
    shown = vm_view(fleet)
    return envelope(vm.VM_DESTROY, vm.VmAction(vm.VmRef(uuid=shown["uuid"], name="web")))


@pytest.mark.parametrize("via", ["amq.default", "commands-exchange"])
def test_an_agent_login_cannot_reach_another_agent(
    bed: tuple[Fleet, SecureBroker, dict[str, str]], via: str
) -> None:
    fleet, broker, names = bed
    before = vm_view(fleet)
    exchange, key = (
        (DEFAULT_EXCHANGE, agent_queue(names["victim"]).name)
        if via == "amq.default"
        else (COMMANDS_EXCHANGE.name, names["victim"])
    )
    refused_by_broker(broker, broker.agents[names["mallory"]], exchange, key, destroy(fleet))
    still_running(fleet, before)


def test_a_command_the_broker_lets_through_is_refused_by_the_agent(
    bed: tuple[Fleet, SecureBroker, dict[str, str]],
) -> None:
    fleet, broker, names = bed
    before, dead = vm_view(fleet), dead_letters(broker)
    rogue = broker.rogue(f"agent-rogue-{uuid.uuid4().hex[:6]}")
    # The agent dead-letters it (and its answer, to a queue it may not reply to, is refused by the
    # broker without disturbing the agent's consumer).
    raw_publish(broker, rogue, DEFAULT_EXCHANGE, agent_queue(names["victim"]).name, destroy(fleet))
    wait_until(lambda: dead_letters(broker) > dead or None, 60, "the forged command dead-lettered")
    still_running(fleet, before)
    assert fleet.cli_ok("vm", "destroy", "web")["vm"]["power_state"] == "shutoff"  # the agent obeys on
    assert fleet.cli_ok("vm", "start", "web")["vm"]["power_state"] == "running"


# ----------------------------------------------------------------------------------- attack 3


def forged_report(victim: str) -> Envelope:
    report = host.HostReport(
        host_id=victim,
        hostname=victim,
        agent_version="forged",
        hypervisor_type="TEST",
        hypervisor_version="1.0.0",
        libvirt_uri="test:///default",
        hw_virt=True,
        cpu=host.CpuTopology(cpus=1),
        memory_mib=1,
        memory_free_mib=1,
        storage=None,
        networks=(),
        bridges=(),
        vms=(),
        seq=10**9,
        started_at=time.time(),
        reported_at=time.time(),
    )
    return envelope(host.HOST_REPORT, report)


def forged_heartbeat(victim: str) -> Envelope:
    return envelope(
        host.HOST_HEARTBEAT,
        host.Heartbeat(host_id=victim, seq=10**9, started_at=time.time(), sent_at=time.time()),
    )


@pytest.mark.parametrize("kind", ["report", "heartbeat"])
def test_a_host_cannot_report_for_another_through_the_reports_exchange(
    bed: tuple[Fleet, SecureBroker, dict[str, str]], kind: str
) -> None:
    fleet, broker, names = bed
    victim, mallory = names["victim"], names["mallory"]
    before, vm_before, dead = host_facts(fleet, victim), vm_view(fleet), dead_letters(broker)
    env = forged_report(victim) if kind == "report" else forged_heartbeat(victim)
    # Keyed with mallory's own host id, which the broker's topic permission allows: the controller
    # must see that the body is about another host than the login's.
    raw_publish(
        broker, broker.agents[mallory], REPORTS_EXCHANGE.name, report_routing_key(env.kind, mallory), env
    )
    wait_until(lambda: dead_letters(broker) > dead or None, 60, "the forged report dead-lettered")
    assert host_facts(fleet, victim) == before
    still_running(fleet, vm_before)


@pytest.mark.parametrize("queue", [REPORTS_QUEUE.name, HEARTBEATS_QUEUE.name])
def test_a_host_cannot_put_a_report_straight_into_the_reports_queues(
    bed: tuple[Fleet, SecureBroker, dict[str, str]], queue: str
) -> None:
    fleet, broker, names = bed
    victim = names["victim"]
    before = host_facts(fleet, victim)
    refused_by_broker(broker, broker.agents[names["mallory"]], DEFAULT_EXCHANGE, queue, forged_report(victim))
    # And when a misconfigured broker lets it through, the controller refuses it: the routing key
    # is the queue's name, not the host's.
    rogue_host = f"rogue-{uuid.uuid4().hex[:6]}"
    rogue = broker.rogue(f"agent-{rogue_host}")
    dead = dead_letters(broker)
    raw_publish(broker, rogue, DEFAULT_EXCHANGE, queue, forged_report(rogue_host))
    wait_until(lambda: dead_letters(broker) > dead or None, 60, "the report put into the queue dead-lettered")
    assert host_facts(fleet, victim) == before
    assert rogue_host not in fleet.hosts()


# ----------------------------------------------------------------------------------- attack 9


def oversized(size: int) -> Envelope:
    """A well-formed API call padded to ``size`` bytes: handled normally were it not for its size."""
    env = envelope(api.API_PING, api.Empty())
    return env.with_body({**codec.to_wire(api.Empty()), "padding": "x" * size})


def test_a_17_mib_message_is_refused_and_the_dead_letter_queue_keeps_its_byte_cap(
    bed: tuple[Fleet, SecureBroker, dict[str, str]],
) -> None:
    fleet, broker, _names = bed
    operator = broker.operator
    # virtfleet's own transport refuses to send it.
    transport = AmqpTransport(broker.url(operator), "big")
    try:
        with pytest.raises(Exception, match="exceeds max_message_bytes"):
            transport.publish(API_EXCHANGE.name, API_QUEUE.name, oversized(17 * MiB))
    finally:
        transport.close()
    # An attacker's client sends five; the controller reads none (they are over max_message_bytes)
    # and dead-letters them, and the dead-letter queue keeps at most its byte cap.
    _, dead_bytes = broker.queue(DEAD_LETTER_QUEUE.name)
    dead = dead_letters(broker)
    for _ in range(5):
        raw_publish(broker, operator, API_EXCHANGE.name, API_QUEUE.name, oversized(17 * MiB))
    # The API queue is a quorum queue: rabbitmqctl's counts of it lag by seconds, so it is asked
    # over AMQP, and the drain is seen as dead letters arriving (virtfleet.dead is classic: exact).
    probe = broker.channel(broker.controller)
    wait_until(
        lambda: (
            probe.queue_declare(API_QUEUE.name, passive=True).method.message_count == 0
            and dead_letters(broker) > dead
        ),
        120,
        "the API queue drained",
    )
    probe.connection.close()
    count, size = broker.queue(DEAD_LETTER_QUEUE.name)
    big = len(oversized(17 * MiB).encode())
    assert count > dead  # dead-lettered, not handled
    print(
        f"dead-lettered {count - dead} of 5 messages of {big} bytes: {size} bytes in {DEAD_LETTER_QUEUE.name}"
    )
    assert count - dead < 5  # the rest dropped (reject-publish)
    # RabbitMQ refuses a message that would take the queue over its cap: the cap holds exactly.
    assert dead_bytes + (count - dead) * big == size <= DEAD_LETTER_MAX_BYTES
    assert 17 * MiB > MAX_MESSAGE_BYTES
    name, pattern, definition = DEAD_LETTER_POLICY  # the cap is bootstrap.sh's policy, as topology says
    policies = [line.split("\t") for line in rabbitmqctl("list_policies", "-p", broker.vhost).splitlines()]
    assert any(p[1] == name and p[2] == pattern and json.loads(p[4]) == definition for p in policies), (
        policies
    )
    assert fleet.cli_ok("vm", "show", "web")["status"] == "active"  # the controller serves on


def test_agents_and_operators_have_connection_and_channel_limits(
    bed: tuple[Fleet, SecureBroker, dict[str, str]],
) -> None:
    _fleet, broker, names = bed
    conns = []
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            for _ in range(20):
                conns.append(
                    pika.BlockingConnection(pika.URLParameters(broker.url(broker.agents[names["mallory"]])))
                )
        assert 1 <= len(conns) < 20
    finally:
        for conn in conns:
            conn.close()


def test_attack_8_the_vnc_password_is_not_in_the_controller_database(
    bed: tuple[Fleet, SecureBroker, dict[str, str]],
) -> None:
    """Attack 8: whoever can read the controller's database (a backup, a 0644 SQLite file) finds
    no VNC password; the SQLite file is the controller's alone."""
    fleet, _broker, names = bed
    created = fleet.cli(
        "vm", "create", "console", "--memory", "128", "--disk", "1", "--host", names["victim"],
        "--graphics", "vnc,password=Att4ck8p,listen=127.0.0.1",
    )  # fmt: skip
    assert created.code == 0, created.stdout + created.stderr
    engine = sa.create_engine(fleet.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, spec FROM vms")).all()
    finally:
        engine.dispose()
    specs = {name: str(spec) for name, spec in rows}
    assert "console" in specs and '"listen": "127.0.0.1"' in specs["console"]  # the row is the VM's
    assert not [name for name, spec in specs.items() if "Att4ck8p" in spec]
    url = sa.engine.make_url(fleet.database_url)
    if url.drivername.startswith("sqlite"):
        assert url.database is not None
        assert stat.S_IMODE(os.stat(url.database).st_mode) == 0o600
    # the password is where the console needs it: in the domain's definition on its host (admins)
    secure = fleet.cli("vm", "export", "console", "--secure", output="table")
    assert secure.code == 0 and "Att4ck8p" in secure.stdout
